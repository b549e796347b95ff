"""Few-step sampling by distillation: reflow (Liu et al., "Flow Straight and Fast").

A trained rectified-flow teacher maps noise z to a sample x along a curved path. Reflow pairs each
z with the teacher's own x (50 guided Euler steps) and trains a student, started from the teacher's
weights, on the straight line between them: x_t = (1 - t) x + t z, target z - x. The coupled paths
barely cross, so the student's trajectories are nearly straight and 1-4 Euler steps suffice. The
guidance weight is baked in: the student takes the label and returns the guided velocity, so it
samples without the doubled batch. Quality is scored next to the teacher's 50-step samples.
"""
import copy
import json
import time
from pathlib import Path

import torch

from genfast import data
from genfast.zoo import _ops, classifier, flow_job, plots, train
from genfast.zoo import rectified_flow as rf

DEFAULTS = dict(pairs=1000, teacher_steps=25, guidance=1.0, student_steps=500, batch=128, lr=5e-4,
                eval_steps=(1, 2, 4), samples_per_class=20)


@torch.no_grad()
def teacher_pairs(teacher, n, *, guidance, steps, size, seed, batch=250):
    """(noise, teacher sample, label) for n class-balanced draws."""
    teacher.eval()
    g = torch.Generator().manual_seed(seed)
    zs, xs, ys = [], [], []
    for i in range(0, n, batch):
        y = torch.arange(i, min(n, i + batch)) % 10
        z = torch.randn(len(y), 1, size, size, generator=g)
        gen = torch.Generator().manual_seed(seed + 1 + i)
        x = _from_noise(teacher, z, y, guidance=guidance, steps=steps, generator=gen)
        zs.append(z), xs.append(x), ys.append(y)
    return torch.cat(zs), torch.cat(xs), torch.cat(ys)


def _from_noise(model, z, y, *, guidance, steps, generator=None):
    """The sampler from a given starting noise (genfast.sample_rectified_flow draws its own)."""
    x = z.clone()
    ts = torch.linspace(1, 0, steps + 1).tolist()
    for i in range(steps):
        b = len(y)
        tt = torch.full((b,), ts[i])
        if guidance:
            v = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, torch.full_like(y, flow_job.NULL)]))
            vc, vu = v.chunk(2)
            x = _ops.flow_euler_step(x, vc, vu, dt=ts[i] - ts[i + 1], guidance=guidance, out=x)
        else:
            x = _ops.flow_euler_step(x, model(x, tt, y), dt=ts[i] - ts[i + 1], out=x)
    return x


def train_student(teacher, pairs, cfg, *, out=None, seed=0, resume=False, progress=True):
    z, x, y = pairs
    student = copy.deepcopy(teacher)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg["lr"], weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 7)

    def step(i):
        student.train()
        idx = torch.randint(0, len(y), (cfg["batch"],), generator=g)
        t = torch.rand(cfg["batch"], generator=g)
        loss = rf.flow_loss(student, x[idx], y[idx], t=t, noise=z[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return {"loss": loss.item()}

    conf = {k: cfg[k] for k in ("pairs", "teacher_steps", "guidance", "student_steps", "batch", "lr")}
    hist = train.fit(step, steps=cfg["student_steps"], state={"model": student, "opt": opt, "rng": g},
                     kind="reflow-student", config=conf, ckpt=None if out is None else Path(out) / "student.pt",
                     resume=resume, progress=progress, desc="training reflow student", items_per_step=cfg["batch"])
    return student, hist


def run(out="out/distill", *, seed=0, resume=False, progress=True, train_steps=None, sample_steps=None, batch=None,
        **_):
    cfg = dict(DEFAULTS)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = {**flow_job.DEFAULTS, **({"train_steps": train_steps} if train_steps else {})}
    t0 = time.perf_counter()
    teacher, _, _ = flow_job.train_model(tcfg, out=out, seed=seed, resume=resume, progress=progress)
    teacher = teacher.cpu()  # the zoo's CPU path from here on
    pairs = teacher_pairs(teacher, cfg["pairs"], guidance=cfg["guidance"], steps=cfg["teacher_steps"],
                          size=tcfg["size"], seed=seed + 11)
    student, hist = train_student(teacher, pairs, cfg, out=out, seed=seed, resume=resume, progress=progress)
    train_s = time.perf_counter() - t0
    student.eval()
    clf, clf_acc = classifier.load_or_train(out, size=tcfg["size"])
    real, _ = data.digits(tcfg["size"], split="test")
    labels = torch.arange(10).repeat_interleave(cfg["samples_per_class"])
    z = torch.randn(len(labels), 1, tcfg["size"], tcfg["size"], generator=torch.Generator().manual_seed(seed + 99))
    res, rows = {}, []
    with torch.no_grad():
        for name, model, steps, w in [("teacher", teacher, 50, cfg["guidance"])] + \
                [("student", student, s, 0.0) for s in cfg["eval_steps"]] + \
                [("teacher", teacher, s, cfg["guidance"]) for s in cfg["eval_steps"]]:
            t1 = time.perf_counter()
            xs = _from_noise(model, z, labels, guidance=w, steps=steps)
            res[f"{name} {steps} steps"] = {**classifier.score(clf, xs, labels, real),
                                            "seconds": round(time.perf_counter() - t1, 2)}
            rows.append((f"{name}, {steps} steps", xs.view(10, -1, 1, tcfg["size"], tcfg["size"])[:, 0]))
    plots.save_grid(out / "samples.png", rows, title="same noise: teacher (CFG w=%g) vs reflow student" % cfg["guidance"])
    plots.save_loss_curve(out / "loss.png", {"reflow student loss": hist["loss"]})
    metrics = {"model": "distill", "method": "reflow (1 round), CFG baked in", **{k: cfg[k] for k in DEFAULTS},
               "train_seconds_total": round(train_s, 1), "classifier_test_accuracy": clf_acc, "scores": res,
               "ops": _ops.which()}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
