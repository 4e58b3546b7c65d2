// hla — the state-gradient scan of the chunked backward (stage 2 of chunk_bwd.cuh's three).
//
// One block per (sequence, value head, V-tile) walks its chunks last to first with dS = ∂loss/∂S
// (K × VT, fp32) in registers, starting from ∂loss/∂(final state). For chunk c, with prepare's
// operands of the forward recompute (chunk_fwd.cuh: Qg = sQ⊙γ, Kd = K⊙γ_C⊘γ, P, W, γ_C):
//     store dS                      the gradient at the chunk's end, for the per-chunk kernel
//     dX = Pᵀ dO + Kd dS            (delta rule: the gradient of Ũ = U − W S0)
//     dS ← diag(γ_C) dS + Qgᵀ dO − Wᵀ dX
// which is the forward scan's recurrence transposed (O = Qg S + P Ũ, Ũ = U − W S,
// S ← diag(γ_C) S + Kdᵀ Ũ). The additive update has Ũ = V, independent of S: dS ← diag(γ_C) dS + Qgᵀ dO.
// What is left after the first chunk is ∂loss/∂h0.
//
// Numerics are the forward scan's: every factor γ is ≤ 1 and prepare computed the operands safely
// for any gate (g = −1000 included). Two kernels: the delta rule on bf16 operands (and a dO the copy
// engine can read) takes chunk_dstate_ws_kernel, wgmma with operands in 2 or 3 TMA stages (below);
// everything else chunk_dstate_kernel, mma.sync on the operand dtype E (bf16; fp32 as 3×tf32) with
// fp32 accumulation, its 16-bit operands double-buffered (chunk c − 1's copies start while chunk c
// computes), fp32 ones single-buffered, as two buffers would not fit.
#pragma once

#include <algorithm>
#include <type_traits>

#include "ops/linear/cuda/chunk_fwd.cuh"

namespace hla::linear::cuda {

struct DScanParams {
    const void* d_o;
    DType do_dt;
    int64_t dos[3];
    const float* dht;  // ∂loss/∂(final state) [N, HV, K, V] or null
    int64_t dhts[3];
    float* dh0;        // ∂loss/∂h0 [N, HV, K, V] or null
    int64_t dh0s[3];
    void* dstates;     // out: [chunk, HV, K, V] in E, ∂loss/∂(state at the end of every chunk)
};

template <class E, int K, int VT, bool kDelta>
struct DScanLayout {
    static constexpr int PAD = sizeof(E) == 2 ? 8 : 4;  // rows stay 16-byte aligned, ldmatrix conflict-free
    static constexpr int LDK = K + PAD;                   // rows of Qg, W, Kd and of the transposed dS
    static constexpr int LDP = kChunk + PAD;              // rows of P
    static constexpr int LDV = VT + PAD;                  // rows of dO and −dX
    static constexpr int NB = sizeof(E) == 2 ? 2 : 1;     // operand buffers
    // one buffer: Qg, dO, and for the delta rule W, Kd, P (element offsets)
    static constexpr size_t qg_off = 0;
    static constexpr size_t do_off = qg_off + size_t(kChunk) * LDK;
    static constexpr size_t w_off = do_off + size_t(kChunk) * LDV;
    static constexpr size_t kd_off = w_off + (kDelta ? size_t(kChunk) * LDK : 0);
    static constexpr size_t p_off = kd_off + (kDelta ? size_t(kChunk) * LDK : 0);
    static constexpr size_t stage = p_off + (kDelta ? size_t(kChunk) * LDP : 0);
    static constexpr size_t ndx_off = NB * stage;                                // −dX [64][LDV]
    static constexpr size_t sb_off = ndx_off + (kDelta ? size_t(kChunk) * LDV : 0);  // dS transposed [VT][LDK]
    static constexpr size_t elems = sb_off + (kDelta ? size_t(VT) * LDK : 0);
    static constexpr size_t bytes = elems * sizeof(E) + NB * K * sizeof(float);    // + γ_C per buffer
};

template <class E, Update Up, int K, int VT, int WARPS>
__global__ void __launch_bounds__(32 * WARPS) chunk_dstate_kernel(const FwdParams p, const DScanParams d) {
    constexpr int kThreads = 32 * WARPS;
    constexpr int NH = WARPS / 4;  // column groups
    static_assert(WARPS == 4 || WARPS == 8, "chunk_dstate: 4 or 8 warps");
    constexpr bool kDelta = Up == Update::Delta;
    using L = DScanLayout<E, K, VT, kDelta>;
    constexpr int LDK = L::LDK, LDP = L::LDP, LDV = L::LDV, NB = L::NB;
    constexpr bool kSplit = sizeof(E) == 4;
    constexpr int NT = VT / 8 / NH;  // n-tiles of a warp's share of the V-tile
    static_assert(NT % 2 == 0, "chunk_dstate: a warp's columns must pair up for ldmatrix.x4");
    constexpr int SMT = K / 64;      // m-tiles of state rows per warp
    constexpr int PER16 = 16 / sizeof(E);
    extern __shared__ float4 smem_f4[];
    E* sm = reinterpret_cast<E*>(smem_f4);
    E* ndX = sm + L::ndx_off;
    E* Sb = sm + L::sb_off;
    float* gcs = reinterpret_cast<float*>(sm + L::elems);

    const int tid = threadIdx.x, warp = tid >> 5;
    const int mw = warp & 3, cw0 = (warp >> 2) * (VT / NH);  // row group; first column of the warp's share
    const int n = blockIdx.x, hv = blockIdx.y, v0 = blockIdx.z * VT;
    const SeqInfo si = p.seqs[n];
    const int nchunks = (si.len + kChunk - 1) / kChunk;
    const int key0 = mw * 16 * SMT;
    const int V = p.V;
    // dO by asynchronous 16-byte copies when it is E with 16-byte aligned rows, else converted
    const bool do_async = d.do_dt == dtype_of<E>() && reinterpret_cast<uintptr_t>(d.d_o) % 16 == 0 &&
                          d.dos[0] % PER16 == 0 && d.dos[1] % PER16 == 0 && d.dos[2] % PER16 == 0;

    auto copy_rows = [&](E* dst, int ld, const E* src, int64_t src_ld, int cols) {
        const int per_row = cols / PER16;
        for (int idx = tid; idx < kChunk * per_row; idx += kThreads) {
            const int r = idx / per_row, c = idx % per_row;
            cp_async16(dst + r * ld + c * PER16, src + r * src_ld + c * PER16);
        }
    };
    auto slot_of = [&](int c) { return size_t(si.first_chunk + c) * p.HV + hv; };
    auto fetch = [&](int c, int b) {
        const size_t slot = slot_of(c);
        E* s = sm + b * L::stage;
        copy_rows(s + L::qg_off, LDK, static_cast<const E*>(p.Qg) + slot * kChunk * K, K, K);
        if constexpr (kDelta) {
            copy_rows(s + L::w_off, LDK, static_cast<const E*>(p.W) + slot * kChunk * K, K, K);
            copy_rows(s + L::kd_off, LDK, static_cast<const E*>(p.Kd) + slot * kChunk * K, K, K);
            copy_rows(s + L::p_off, LDP, static_cast<const E*>(p.P) + slot * kChunk * kChunk, kChunk, kChunk);
        }
        for (int c4 = tid; c4 < K / 4; c4 += kThreads) cp_async16(gcs + b * K + 4 * c4, p.gC + slot * K + 4 * c4);
        // dO rows past the sequence's end are zero (P and Kd are zero there, but 0 · garbage may be NaN)
        const int len = min(kChunk, si.len - c * kChunk);
        const int64_t row0 = si.batch * d.dos[0] + (si.start + int64_t(c) * kChunk) * d.dos[1] + hv * d.dos[2] + v0;
        E* dst = s + L::do_off;
        if (do_async) {
            constexpr int per_row = VT / PER16;
            const E* src = static_cast<const E*>(d.d_o) + row0;
            for (int idx = tid; idx < kChunk * per_row; idx += kThreads) {
                const int r = idx / per_row, cc = idx % per_row;
                const bool in = r < len;
                cp_async16_zfill(dst + r * LDV + cc * PER16, src + (in ? r : 0) * d.dos[1] + cc * PER16, in);
            }
        } else {
            for (int idx = tid; idx < kChunk * VT; idx += kThreads) {
                const int r = idx / VT, cc = idx % VT;
                const float x = r < len ? load_any(d.d_o, d.do_dt, row0 + r * d.dos[1] + cc) : 0.f;
                dst[r * LDV + cc] = from_f<E>(x);
            }
        }
    };

    // The warp's block of dS: keys [key0, key0 + 16·SMT), columns [cw0, cw0 + VT/NH) of the tile.
    float S[SMT][NT][4];
    if (d.dht) {
        const float* src = d.dht + n * d.dhts[0] + hv * d.dhts[1];
        for_each_acc(S, [&](int r, int c, float& x) { x = src[(key0 + r) * d.dhts[2] + v0 + cw0 + c]; });
    } else {
        zero_acc(S);
    }
    if constexpr (kDelta) for_each_acc(S, [&](int r, int c, float& x) { Sb[(cw0 + c) * LDK + key0 + r] = from_f<E>(x); });
    if (NB == 2 && nchunks > 0) {
        fetch(nchunks - 1, 0);
        cp_async_commit();
    }

    for (int it = 0; it < nchunks; ++it) {
        const int c = nchunks - 1 - it;
        const int b = NB == 2 ? (it & 1) : 0;
        if constexpr (NB == 1) {
            __syncthreads();  // every read of the previous chunk's operands is done
            fetch(c, 0);
            cp_async_commit();
        }
        cp_async_wait_all();
        __syncthreads();  // chunk c's operands and the transposed dS are in place
        if constexpr (NB == 2) {
            if (it + 1 < nchunks) {
                fetch(c - 1, b ^ 1);  // the other buffer: last read by the previous iteration
                cp_async_commit();
            }
        }
        const E* s = sm + b * L::stage;
        const E* dO = s + L::do_off;
        store_acc<E>(S, static_cast<E*>(d.dstates) + slot_of(c) * K * V + size_t(key0) * V + v0 + cw0, V);
        if constexpr (kDelta) {
            // −dX, rows [16·mw, +16), the warp's columns
            float X[1][NT][4];
            zero_acc(X);
            warp_gemm<E, 1, NT, kSplit>(X, Tile<E>{s + L::p_off + mw * 16, 1, LDP}, Tile<E>{dO + cw0, LDV, 1}, kChunk);
            warp_gemm<E, 1, NT, kSplit>(X, Tile<E>{s + L::kd_off + mw * 16 * LDK, LDK, 1}, Tile<E>{Sb + cw0 * LDK, 1, LDK},
                                        K);
            for_each_acc(X, [&](int r, int cc, float& x) { ndX[(mw * 16 + r) * LDV + cw0 + cc] = from_f<E>(-x); });
        }
        // the part of the update that does not wait for −dX, before the barrier that −dX needs (a warp
        // done with its rows of −dX fills the wait with it)
        const float* gc = gcs + b * K;
        for_each_acc(S, [&](int r, int, float& x) { x *= gc[key0 + r]; });
        warp_gemm<E, SMT, NT, kSplit>(S, Tile<E>{s + L::qg_off + key0, 1, LDK}, Tile<E>{dO + cw0, LDV, 1}, kChunk);
        if constexpr (kDelta) {
            __syncthreads();  // −dX complete; every read of the transposed dS is done
            warp_gemm<E, SMT, NT, kSplit>(S, Tile<E>{s + L::w_off + key0, 1, LDK}, Tile<E>{ndX + cw0, LDV, 1}, kChunk);
            for_each_acc(S, [&](int r, int cc, float& x) { Sb[(cw0 + cc) * LDK + key0 + r] = from_f<E>(x); });
        }
    }
    if (d.dh0) {
        float* dst = d.dh0 + n * d.dh0s[0] + hv * d.dh0s[1];
        for_each_acc(S, [&](int r, int c, float& x) { dst[(key0 + r) * d.dh0s[2] + v0 + cw0 + c] = x; });
    }
}

// ---- the warp-specialised state-gradient scan (delta rule, bf16 operands, bf16 dO) ----------------
//
// chunk_scan_ws_kernel's design run backwards (chunk_fwd.cuh): wgmma on swizzled tiles, operands by
// the copy engine from a producer warp, two warpgroups:
//   state warpgroup   dS (keys 16·(w % 4) + 64·i, all VT columns) in registers: stores it, then
//                     dS ← diag(γ_C) dS + Qgᵀ dO (+ Wᵀ (−dX) once −dX is in), and the new dS into the
//                     other of two buffers;
//   X warpgroup       −dX = −(Pᵀ dO + Kd dS) of the chunk's rows, handed over by a named barrier
//                     it only arrives at.
template <int K, int VT>
struct DScanWsLayout {
    static constexpr size_t row_tile = size_t(kChunk) * K * 2;  // Qg, W, Kd
    static constexpr size_t p_tile = size_t(kChunk) * kChunk * 2;
    static constexpr size_t v_tile = size_t(kChunk) * VT * 2;   // dO, −dX
    static constexpr size_t s_tile = size_t(K) * VT * 2;        // a dS buffer
    static constexpr size_t stage = 3 * row_tile + v_tile + p_tile;  // Qg, dO, W, Kd, P
    static constexpr size_t fixed = v_tile + 2 * s_tile;              // −dX, 2 × dS
    static constexpr size_t kAlign = 1024;
    static constexpr size_t bytes_with(int st) {
        return kAlign + st * stage + fixed + st * K * sizeof(float) + 2 * st * sizeof(uint64_t);
    }
    static constexpr size_t kSmemMax = 227 * 1024;
    static constexpr int stages = bytes_with(3) <= kSmemMax ? 3 : 2;
    static constexpr size_t tiles = stages * stage + fixed;
    static constexpr size_t bytes = bytes_with(stages);
};

// The tensor maps of chunk_dstate_ws_kernel: prepare's Qg, Kd, W, P (ScanMaps' fields) and dO.
struct DScanMaps {
    CUtensorMap Qg, Kd, W, P, dO;
};

template <int K, int VT>
__global__ void __launch_bounds__(ScanWs<false>::kThreads, 1)
    chunk_dstate_ws_kernel(const FwdParams p, const DScanParams d, const __grid_constant__ DScanMaps maps) {
    using E = __nv_bfloat16;
    constexpr int kRole = ScanWs<false>::kRoleThreads, kConsumers = 2 * kRole;
    using L = DScanWsLayout<K, VT>;
    using RowT = wg::Swz<64>;
    using ColT = wg::Swz<VT>;
    constexpr int NT = VT / 8, SMT = K / 64, KS = K / 16;
    constexpr int kBarX = 1, kBarChunk = 2;
    constexpr int kStages = L::stages;
    extern __shared__ float4 smem_f4[];
    unsigned char* const base = wg::aligned_smem<L::kAlign>(smem_f4);
    unsigned char* const ndX = base + kStages * L::stage;  // −dX [64][VT]
    unsigned char* const Sbuf = ndX + L::v_tile;            // 2 × dS [key][v]
    float* gcs = reinterpret_cast<float*>(base + L::tiles);
    uint64_t* full = reinterpret_cast<uint64_t*>(gcs + kStages * K);
    uint64_t* empty = full + kStages;
    auto Qt_of = [&](int b) { return base + b * L::stage; };
    auto Ot_of = [&](int b) { return Qt_of(b) + L::row_tile; };  // dO
    auto Wt_of = [&](int b) { return Ot_of(b) + L::v_tile; };
    auto Kt_of = [&](int b) { return Wt_of(b) + L::row_tile; };
    auto Pt_of = [&](int b) { return Kt_of(b) + L::row_tile; };

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const bool state_role = warp < 4;
    const int mw = warp & 3, rt = tid % kRole;
    const int n = blockIdx.x, hv = blockIdx.y, v0 = blockIdx.z * VT;
    init_stage_barriers(full, empty, kStages, kConsumers);
    const SeqInfo si = p.seqs[n];
    const int nchunks = (si.len + kChunk - 1) / kChunk;
    auto slot_of = [&](int c) { return size_t(si.first_chunk + c) * p.HV + hv; };

    if (warp == ScanWs<false>::kProducerWarp) {
        // chunk c = nchunks − 1 − it into stage it % kStages (rows of dO past the sequence's end are
        // the next sequence's or zero: the X warpgroup zeroes them)
        if (lane != 0) return;
        constexpr uint32_t kRowTile = uint32_t(L::row_tile), kBlock = kChunk * RowT::kRowBytes;
        constexpr uint32_t bytes = 3 * kRowTile + uint32_t(L::v_tile) + uint32_t(L::p_tile) + K * 4;
        for (int it = 0; it < nchunks; ++it) {
            const int c = nchunks - 1 - it, b = it % kStages;
            if (it >= kStages) tma::mbar_wait(empty + b, (it / kStages - 1) & 1);
            uint64_t* bar = full + b;
            tma::mbar_expect(bar, bytes);
            const int row = int(slot_of(c) * kChunk);
            for (int kb = 0; kb < K / 64; ++kb) {
                tma::load_2d(Qt_of(b) + kb * kBlock, &maps.Qg, 64 * kb, row, bar);
                tma::load_2d(Wt_of(b) + kb * kBlock, &maps.W, 64 * kb, row, bar);
                tma::load_2d(Kt_of(b) + kb * kBlock, &maps.Kd, 64 * kb, row, bar);
            }
            tma::load_2d(Pt_of(b), &maps.P, 0, row, bar);
            tma::load_4d(Ot_of(b), &maps.dO, v0, hv, si.start + c * kChunk, si.batch, bar);
            tma::load_bytes(gcs + b * K, p.gC + slot_of(c) * K, K * 4, bar);
        }
        return;
    }

    // state warpgroup: dS, keys 16·mw + 64·i
    float S[SMT][NT][4];
    const int key0 = 16 * mw;
    if (state_role) {
        if (d.dht) {
            const float* src = d.dht + n * d.dhts[0] + hv * d.dhts[1];
            for_each_acc<SMT, NT, 64>(S, [&](int r, int c, float& x) { x = src[(key0 + r) * d.dhts[2] + v0 + c]; });
        } else {
            zero_acc(S);
        }
        store_state_swz<K, VT>(S, Sbuf, mw);
    }
    float X[1][NT][4];
    zero_acc(X);

    for (int it = 0; it < nchunks; ++it) {
        const int c = nchunks - 1 - it, sb = it % kStages, b = it & 1;
        tma::mbar_wait(full + sb, (it / kStages) & 1);
        const int len = min(kChunk, si.len - c * kChunk);
        if (!state_role && len < kChunk) zero_rows_swz<VT, VT>(Ot_of(sb), len, rt, kRole);  // 0 · garbage may be NaN
        wg::fence_proxy_async();
        named_bar_sync(kBarChunk, kConsumers);  // chunk c's operands, zeroed rows and dS in place
        if (state_role) {
            store_acc<E, SMT, NT, 64>(S, static_cast<E*>(d.dstates) + slot_of(c) * K * p.V + size_t(key0) * p.V + v0, p.V);
            scale_acc_rows<SMT, NT, 64>(S, gcs + sb * K + key0);
            // dS += Qgᵀ dO (A: Qg read key-major), then dS += Wᵀ (−dX)
            wg::fence();
            wg::cols_product(S, Qt_of(sb), Ot_of(sb));
            wg::commit();
            named_bar_sync(kBarX, kConsumers);  // −dX from the X warpgroup
            wg::cols_product(S, Wt_of(sb), ndX);
            wg::finish(S);
            tma::release_stage(empty + sb);
            store_state_swz<K, VT>(S, Sbuf + (b ^ 1) * L::s_tile, mw);
        } else {
            // X = Kd dS + Pᵀ dO, rows [16·mw, +16) (A: P read column-major)
            wg::fence();
            wg::rows_product<KS>(X[0], Kt_of(sb), Sbuf + b * L::s_tile, false);
            wg::cols_product(X, Pt_of(sb), Ot_of(sb));
            wg::finish(X);
            for_each_acc_pair(X, [&](int r, int cc, float& x0, float& x1) {
                *reinterpret_cast<uint32_t*>(ndX + ColT::template elem<kChunk>(16 * mw + r, cc)) =
                    pack2(__float2bfloat16(-x0), __float2bfloat16(-x1));
            });
            wg::fence_proxy_async();
            named_bar_arrive(kBarX, kConsumers);
            tma::release_stage(empty + sb);
        }
    }
    if (state_role && d.dh0) {
        float* dst = d.dh0 + n * d.dh0s[0] + hv * d.dh0s[1];
        for_each_acc<SMT, NT, 64>(S, [&](int r, int c, float& x) { dst[(key0 + r) * d.dh0s[2] + v0 + c] = x; });
    }
}

template <int K, int VT>
void launch_dstate_ws(const FwdParams& fp, const DScanParams& d, const DScanMaps& maps, int n_seqs, const char* op) {
    constexpr size_t smem = DScanWsLayout<K, VT>::bytes;
    static_assert(smem <= 227 * 1024, "chunk_dstate_ws: shared memory over the 227 KiB of an SM");
    raise_smem_limit<chunk_dstate_ws_kernel<K, VT>>(smem, op);
    const dim3 grid(n_seqs, fp.HV, fp.V / VT);
    chunk_dstate_ws_kernel<K, VT><<<grid, ScanWs<false>::kThreads, smem, launch_stream()>>>(fp, d, maps);
    check_cuda(cudaGetLastError(), op, "chunk_dstate_ws launch");
}

template <class E, Update Up, int K, int VT, int WARPS>
void launch_dstate(const FwdParams& fp, const DScanParams& d, int n_seqs, const char* op) {
    constexpr size_t smem = DScanLayout<E, K, VT, Up == Update::Delta>::bytes;
    static_assert(smem <= 227 * 1024, "chunk_dstate: shared memory over the 227 KiB of an SM");
    raise_smem_limit<chunk_dstate_kernel<E, Up, K, VT, WARPS>>(smem, op);
    const dim3 grid(n_seqs, fp.HV, fp.V / VT);
    chunk_dstate_kernel<E, Up, K, VT, WARPS><<<grid, 32 * WARPS, smem, launch_stream()>>>(fp, d);
    check_cuda(cudaGetLastError(), op, "chunk_dstate launch");
}

template <class E, Update Up, int K>
void launch_dstate_vt(const FwdParams& fp, const DScanParams& d, int n_seqs, int vt, const char* op) {
    // the forward scan's tiles: 16-bit operands 8 warps for 32 and 64 columns, 4 for 16; fp32 4 warps, ≤ 32
    if constexpr (sizeof(E) == 2) {
        if (vt == 64) return launch_dstate<E, Up, K, 64, 8>(fp, d, n_seqs, op);
        if (vt == 32) return launch_dstate<E, Up, K, 32, 8>(fp, d, n_seqs, op);
    } else {
        if (vt >= 32) return launch_dstate<E, Up, K, 32, 4>(fp, d, n_seqs, op);
    }
    return launch_dstate<E, Up, K, 16, 4>(fp, d, n_seqs, op);
}

// Stage 2 for operand dtype E (instantiated in bwd_scan_<E>.cu), with the forward scan's V-tile:
// the warp-specialised kernel for the delta rule on bf16 operands and a bf16 dO whose rows the copy
// engine can read (rows_tma_ready), else chunk_dstate. H100, bf16, B=4 T=4096 H=16 K=V=128, ncu, same call: Gated DeltaNet 227.5 ->
// 211.9 us; the additive update (no dX: one warpgroup does all of it) 140.3 -> 161.2, so it stays on
// chunk_dstate.
template <class E>
void dstate_scan(const Problem& p, const FwdParams& fp, const DScanParams& d) {
    const int n_seqs = int(p.N());
    const int vt = scan_tile_width<E>(int64_t(n_seqs) * p.HV, p.V);
    const bool delta = p.delta();
    if constexpr (sizeof(E) == 2) {
        const TensorView& o = p.args.o;  // dO has o's shape
        const TensorView dO = TensorView::strided(const_cast<void*>(d.d_o), DType::BF16,
                                                  {o.shape[0], o.shape[1], o.shape[2], o.shape[3]},
                                                  {d.dos[0], d.dos[1], d.dos[2], 1}, o.device, o.device_index);
        size_t slots = 0;
        for (const Sequence& s : p.seqs) slots += size_t((s.len + kChunk - 1) / kChunk) * p.HV;
        if (delta && d.do_dt == DType::BF16 && rows_tma_ready(dO) && slots > 0) {
            DScanMaps maps{};
            encode_slot_rows(&maps.Qg, fp.Qg, slots, p.K, 64, p.op);
            encode_slot_rows(&maps.Kd, fp.Kd, slots, p.K, 64, p.op);
            encode_slot_rows(&maps.W, fp.W, slots, p.K, 64, p.op);
            encode_slot_rows(&maps.P, fp.P, slots, kChunk, 64, p.op);
            encode_input_rows(&maps.dO, dO, vt, p.op);
            auto run = [&](auto k) {
                constexpr int KK = decltype(k)::value;
                if (vt == 64) launch_dstate_ws<KK, 64>(fp, d, maps, n_seqs, p.op);
                else if (vt == 32) launch_dstate_ws<KK, 32>(fp, d, maps, n_seqs, p.op);
                else launch_dstate_ws<KK, 16>(fp, d, maps, n_seqs, p.op);
            };
            if (p.K == 64) run(std::integral_constant<int, 64>{});
            else run(std::integral_constant<int, 128>{});
            return;
        }
    }
    if (p.K == 64) {
        if (delta) launch_dstate_vt<E, Update::Delta, 64>(fp, d, n_seqs, vt, p.op);
        else launch_dstate_vt<E, Update::Additive, 64>(fp, d, n_seqs, vt, p.op);
    } else {
        if (delta) launch_dstate_vt<E, Update::Delta, 128>(fp, d, n_seqs, vt, p.op);
        else launch_dstate_vt<E, Update::Additive, 128>(fp, d, n_seqs, vt, p.op);
    }
}

}  // namespace hla::linear::cuda
