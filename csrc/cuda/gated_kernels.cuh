// The gated-residual kernels of csrc/cuda/modulate.cu (included there, inside its anonymous
// namespace, after its constants and before the launchers): x + gate * y forward, and the backward
// (dy, dgate per token or per sample, and optionally the bias gradient: csrc/modulate.h).
#pragma once
// ------------------------------------------------------------------------------ gated residual
// Element path (any C, any alignment): a grid-stride loop over elements.
template <int DT>
__global__ void __launch_bounds__(256) gated_fwd_kernel(const GatedResidualParams p) {
  const int64_t total = p.B * p.N * p.C;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = i % p.C, r = i / p.C, b = r / p.N, n = r % p.N;
    const float v = dev::load_elem<DT>(p.x, b * p.x_sb + n * p.x_sn + c) +
                    dev::load_elem<DT>(p.gate, b * p.gate_sb + n * p.gate_sn + c) *
                        dev::load_elem<DT>(p.y, b * p.y_sb + n * p.y_sn + c);
    dev::store_elem<DT>(p.out, b * p.out_sb + n * p.out_sn + c, v);  // out may be x: read first
  }
}

// 16-byte path (vec_ok: C % V == 0, every pointer and row stride 16-byte aligned, so a pack never
// straddles a row). The [B, N, C] tensors are `packs` = B * N * C / V packs, row-major; thread t
// of the G launched takes packs t, t + G, t + 2G, ... (consecutive threads, consecutive packs:
// coalesced), kGatedUnroll of them per step: all loads of a step are issued before the first
// store and held raw (widened to fp32 only at the math), so each thread keeps kGatedUnroll * 48
// bytes (x, gate, y) in flight. The
// grid is one wave of resident blocks, so every thread's share is within one pack of the others'.
// A per-sample gate row (gate_sn = 0) is re-read for every token: L1/L2 hits. Same math as the
// element path, x + gate * y in fp32. I: uint32_t when 2 * packs fits (cheap 32-bit divisions),
// else int64_t.
constexpr int kGatedThreads = 256;
constexpr int kGatedUnroll = 4;

template <int DT, class I>
__global__ void __launch_bounds__(kGatedThreads) gated_fwd_pack_kernel(const GatedResidualParams p, I packs,
                                                                       I row_packs) {
  constexpr int V = dev::kPack<DT>;
  const I N = static_cast<I>(p.N);
  const I G = static_cast<I>(gridDim.x) * kGatedThreads;
  const E<DT>* x = static_cast<const E<DT>*>(p.x);
  const E<DT>* gate = static_cast<const E<DT>*>(p.gate);
  const E<DT>* y = static_cast<const E<DT>*>(p.y);
  E<DT>* out = static_cast<E<DT>*>(p.out);
  for (I base = static_cast<I>(blockIdx.x) * kGatedThreads + threadIdx.x; base < packs; base += kGatedUnroll * G) {
    uint4 xr[kGatedUnroll], gr[kGatedUnroll], yr[kGatedUnroll];  // raw: 12 registers a pack in flight
    int64_t o[kGatedUnroll];
#pragma unroll
    for (int u = 0; u < kGatedUnroll; ++u) {
      const I i = base + u * G;
      if (i >= packs) continue;
      const I r = i / row_packs, b = r / N, n = r - b * N;
      const int64_t c = static_cast<int64_t>(i - r * row_packs) * V;
      const int64_t bb = static_cast<int64_t>(b), nn = static_cast<int64_t>(n);
      xr[u] = dev::load_pack_raw(x + (bb * p.x_sb + nn * p.x_sn + c));
      gr[u] = dev::load_pack_raw(gate + (bb * p.gate_sb + nn * p.gate_sn + c));
      yr[u] = dev::load_pack_raw(y + (bb * p.y_sb + nn * p.y_sn + c));
      o[u] = bb * p.out_sb + nn * p.out_sn + c;
    }
#pragma unroll
    for (int u = 0; u < kGatedUnroll; ++u) {
      if (base + u * G >= packs) continue;
      float xv[V], gv[V], yv[V], v[V];
      dev::unpack_pack<DT>(xr[u], xv);
      dev::unpack_pack<DT>(gr[u], gv);
      dev::unpack_pack<DT>(yr[u], yv);
#pragma unroll
      for (int j = 0; j < V; ++j) v[j] = xv[j] + gv[j] * yv[j];
      dev::store_pack<DT>(out + o[u], v);  // out may be x: this thread read that pack above
    }
  }
}

// dy = g * gate everywhere; dgate = g * y per token (elementwise) or, per sample, its column sums
// over a row chunk into partial[b, chunk, C]; with dbias, the chunk's column sums of dy as stored
// into bias_partial[b, chunk, C]. grid = (ceil(C / kColBlock), nchunks, B), one column per thread,
// so the chunk's rows are walked in order.
template <int DT>
__global__ void __launch_bounds__(kColBlock) gated_bwd_kernel(const GatedResidualBwdParams p, int64_t rows_per_block) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * kColBlock + threadIdx.x;
  const int64_t k = blockIdx.y, b = blockIdx.z;
  if (c >= p.C) return;
  const int64_t n0 = k * rows_per_block, n1 = n0 + rows_per_block < p.N ? n0 + rows_per_block : p.N;
  float acc = 0.f, bias_acc = 0.f;
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t r = b * p.N + n;
    const float g = dev::load_elem<DT>(p.grad, b * p.g_sb + n * p.g_sn + c);
    const float y = dev::load_elem<DT>(p.y, b * p.y_sb + n * p.y_sn + c);
    if (p.dy) {
      // __fmul_rn: not contracted into the sum below (it must add the stored values)
      const float d = dev::round_to<DT>(__fmul_rn(g, dev::load_elem<DT>(p.gate, b * p.gate_sb + n * p.gate_sn + c)));
      dev::store_elem<DT>(p.dy, r * p.C + c, d);
      bias_acc += d;
    }
    if (p.per_sample) acc = fmaf(g, y, acc);  // explicit: nvcc may contract or not per kernel
    else if (p.dgate) dev::store_elem<DT>(p.dgate, r * p.C + c, g * y);
  }
  if (p.per_sample && p.dgate) p.partial[(b * gridDim.y + k) * p.C + c] = acc;
  if (p.dbias) p.bias_partial[(b * gridDim.y + k) * p.C + c] = bias_acc;
}

// 16-byte backward (vec_ok over grad, gate, y, dy, dgate): the same walk with a pack of V columns
// a thread, kGatedBwdRows rows' loads issued before the first store. Per-sample sums keep the
// element kernel's order (rows n0, n1, ... one after the other per column): the same bits.
constexpr int kGatedBwdThreads = 64;  // pack columns a block (C = 1152 bf16: 144 packs, 3 blocks)
constexpr int kGatedBwdRows = 4;
constexpr int kGatedTokenRows = 8;  // per token: rows a block (any split is exact there)

template <int DT>
__global__ void __launch_bounds__(kGatedBwdThreads) gated_bwd_pack_kernel(const GatedResidualBwdParams p,
                                                                          int64_t rows_per_block) {
  constexpr int V = dev::kPack<DT>;
  constexpr int R = kGatedBwdRows;
  const int64_t c = (static_cast<int64_t>(blockIdx.x) * kGatedBwdThreads + threadIdx.x) * V;
  const int64_t k = blockIdx.y, b = blockIdx.z;
  if (c >= p.C) return;
  const int64_t n0 = k * rows_per_block, n1 = n0 + rows_per_block < p.N ? n0 + rows_per_block : p.N;
  const E<DT>* grad = static_cast<const E<DT>*>(p.grad) + b * p.g_sb + c;
  const E<DT>* gate = static_cast<const E<DT>*>(p.gate) + b * p.gate_sb + c;
  const E<DT>* y = static_cast<const E<DT>*>(p.y) + b * p.y_sb + c;
  const bool want_y = p.dgate != nullptr;
  float acc[V], bias_acc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) acc[j] = bias_acc[j] = 0.f;
  for (int64_t n = n0; n < n1; n += R) {
    uint4 gr[R], tr[R], yr[R];
#pragma unroll
    for (int u = 0; u < R; ++u) {
      if (n + u >= n1) continue;
      gr[u] = dev::load_pack_raw(grad + (n + u) * p.g_sn);
      if (p.dy) tr[u] = dev::load_pack_raw(gate + (n + u) * p.gate_sn);
      if (want_y) yr[u] = dev::load_pack_raw(y + (n + u) * p.y_sn);
    }
#pragma unroll
    for (int u = 0; u < R; ++u) {
      if (n + u >= n1) continue;
      const int64_t r = b * p.N + n + u;
      float gv[V], t[V], o[V];
      dev::unpack_pack<DT>(gr[u], gv);
      if (p.dy) {
        dev::unpack_pack<DT>(tr[u], t);
#pragma unroll
        for (int j = 0; j < V; ++j) o[j] = __fmul_rn(gv[j], t[j]);  // not contracted into bias_acc
        dev::store_pack<DT>(static_cast<E<DT>*>(p.dy) + r * p.C + c, o);
#pragma unroll
        for (int j = 0; j < V; ++j) bias_acc[j] += dev::round_to<DT>(o[j]);  // as stored
      }
      if (!want_y) continue;
      dev::unpack_pack<DT>(yr[u], t);
      if (p.per_sample) {
#pragma unroll
        for (int j = 0; j < V; ++j) acc[j] = fmaf(gv[j], t[j], acc[j]);  // as the element kernel
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) o[j] = gv[j] * t[j];
        dev::store_pack<DT>(static_cast<E<DT>*>(p.dgate) + r * p.C + c, o);
      }
    }
  }
  if (p.per_sample && want_y) {
    float* part = p.partial + (b * gridDim.y + k) * p.C + c;
#pragma unroll
    for (int j = 0; j < V; ++j) part[j] = acc[j];
  }
  if (p.dbias) {
    float* part = p.bias_partial + (b * gridDim.y + k) * p.C + c;
#pragma unroll
    for (int j = 0; j < V; ++j) part[j] = bias_acc[j];
  }
}
