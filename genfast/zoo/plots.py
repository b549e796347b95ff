"""PNG output of the main job: labelled image grids and loss curves (matplotlib, Agg backend)."""
import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def tile(images, pad=1):
    """[k, C, H, W] in [-1, 1] -> one row image [H, k*(W+pad)] in [0, 1] (grey: first channel)."""
    x = images.detach().float().clamp(-1, 1)[:, 0] * 0.5 + 0.5
    k, h, w = x.shape
    row = torch.ones(h, k * (w + pad))
    for i in range(k):
        row[:, i * (w + pad):i * (w + pad) + w] = x[i]
    return row


def save_grid(path, rows, *, title=None, pad=1):
    """rows: [(label, images [k, C, H, W])], one labelled row each (same H, W)."""
    plt = _plt()
    imgs = [tile(r, pad) for _, r in rows]
    h, width = imgs[0].shape[0], max(im.shape[1] for im in imgs)
    imgs = [torch.cat([im, torch.ones(h, width - im.shape[1])], 1) for im in imgs]  # shorter rows: blank tail
    sep = torch.ones(pad, width)
    grid = torch.cat([torch.cat([im, sep]) for im in imgs])
    fig_w = max(4.0, grid.shape[1] / 18)
    fig, ax = plt.subplots(figsize=(fig_w + 1.5, grid.shape[0] / 18 + 0.6))
    ax.imshow(grid.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks([(h + pad) * i + h / 2 for i in range(len(rows))])
    ax.set_yticklabels([str(label) for label, _ in rows], fontsize=8)
    ax.set_xticks([])
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def save_loss_curve(path, curves, *, title="training loss", logy=True):
    """curves: {name: [value per step]}; raw values faint, running mean on top."""
    from genfast.zoo.train import smoothed

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in curves.items():
        if not values:
            continue
        line, = ax.plot(values, alpha=0.25, lw=0.7)
        ax.plot(smoothed(values), color=line.get_color(), lw=1.5, label=name)
    if logy and all(v > 0 for vs in curves.values() for v in vs):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
