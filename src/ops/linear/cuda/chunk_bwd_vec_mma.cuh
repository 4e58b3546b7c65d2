// hla — stage 3 of the chunked backward on 16-bit tensor cores for vector decay (GLA, KDA): bf16 inputs,
// per-channel log decay g [B, T, HV, K], additive or delta update.
//
// Two kernels, one block (16 warps) per (chunk, query/key head) each, walking the G value heads of the
// group:
//   1. chunk_bwd_mma_kernel<Up, kVec = true> (chunk_bwd_mma.cuh): every product whose dot carries no
//      decay — X, dX = Pᵀ dO + K̄ dS_C (P and K̄ from stage 1), Z = Tᵀ dX, dv, dP = dO Xᵀ,
//      dD = diag(β)(−Z Xᵀ), dβ's ⟨Z, v⟩ and Σ_j dA_ij D_ij, and the raw dO S0ᵀ, M = Z S0ᵀ, X dS_Cᵀ —
//      handed over in bf16 through Params::v_* (about 65 KiB per chunk and value head at K = V = 128).
//   2. chunk_bwd_vec_kernel below: the decayed products of dP and dD, the per-element decay factors of
//      the K-wide terms, dβ's K⊙γ term, ∂b → dg, dq and dk through the norms.
//
// With b_i the in-chunk cumulative log decay (per channel):
//   dq_i = Σ_{j<i} dP_ij k̂_j ⊙ e^{b_i − b_j} + dP_ii k̂_i + (dO S0ᵀ)_i ⊙ e^{b_i}
//   dk_j = Σ_{i>j} (dP_ij q̂_i + dD_ij k̂_i) ⊙ e^{b_i − b_j} + Σ_{i<j} dD_ji k̂_i ⊙ e^{b_j − b_i}
//          + dP_jj q̂_j − β_j M_j ⊙ e^{b_j} + (X dS_Cᵀ)_j ⊙ e^{b_C − b_j}
//   ∂b_i = q̂_i ⊙ (dq_i − dP_ii k̂_i) + k̂_i ⊙ (row-side dD terms − column-side terms − β_i M_i ⊙ e^{b_i})
//          − K̄_i ⊙ dK̄_i (+ at the last token: Σ_i K̄_i ⊙ dK̄_i + e^{b_C} ⊙ Σ_e S0 ⊙ dS_C)
//   dg_t = Σ_{i≥t} ∂b_i, assembled per channel as e^{b_C} Σ_e S0 ⊙ dS_C + Σ_{i≥t} ∂b'_i + Σ_{i<t} K̄_i ⊙ dK̄_i
//          (∂b' without the K̄ terms: their sum telescopes to the exclusive prefix, no cancellation).
//
// Decay factoring (the forward's, chunk_prepare_mma.cuh): 16-row blocks I with reference R_I = b_{16I},
// Δ_i = b_i − R_I, block sums S_I = R_{I+1} − R_I (S_3 = b_C − R_3), every exponent a sum of one-signed
// terms. Warp w owns rows I = w % 4 of every result and a quarter of the key columns (w / 4).
//   row side (out rows I):    out_i = e^{Δ_i} ⊙ Σ_{J≤I} E_IJ (y_J ⊙ e^{R_I − b_J})        R_I − b_j ≤ 0 for J < I
//   column side (out rows J): out_j = e^{S_J − Δ_j} ⊙ Σ_{I≥J} E_IJᵀ (x_I ⊙ e^{b_I − R_{J+1}})   ≤ 0 for I > J
// On the diagonal block the two factors of a pair are at most e^{−S_J} ≥ 1 apart; when a block's decay
// exceeds e^80 in some channel (S_J < −80, g = −1000 does) its diagonal pairs are summed element by
// element with e^{Δ_i − Δ_j} ≤ 1 instead (slow, exact, only for such blocks).
#pragma once

#include "ops/linear/cuda/chunk_bwd_mma.cuh"

namespace hla::linear::cuda {

namespace bwd {

template <Update Up, int K>
struct VecLayout {
    static constexpr int LDK = K + 8;       // bf16 rows of q̂, k̂
    static constexpr int LDF = K + 4;       // fp32 rows of Δ, ∂b', K̄ ⊙ dK̄
    static constexpr int LDC = kChunk + 8;  // bf16 rows of dP, dD
    static constexpr size_t q_off = 0;
    static constexpr size_t k_off = q_off + size_t(kChunk) * LDK * 2;
    static constexpr size_t dl_off = k_off + size_t(kChunk) * LDK * 2;   // Δ (raw gates until the sums)
    static constexpr size_t db_off = dl_off + size_t(kChunk) * LDF * 4;  // ∂b' (without the K̄ terms)
    static constexpr size_t kb_off = db_off + size_t(kChunk) * LDF * 4;  // K̄ ⊙ dK̄, then its exclusive prefix
    static constexpr size_t st_off = kb_off + size_t(kChunk) * LDF * 4;  // R_0, S_0 .. S_3 per channel
    static constexpr size_t ep_off = st_off + size_t(5) * K * 4;         // dP, strictly lower
    static constexpr size_t ed_off = ep_off + size_t(kChunk) * LDC * 2;  // dD, strictly lower
    static constexpr size_t r_off = ed_off + size_t(kChunk) * LDC * 2;   // per row: dP_ii, β, raw β, dβ, q's and k's 1 / ‖x‖
    // the gate sums' per-block first tokens and sums (fp32 [4][K] each), later dg's per row segment and
    // channel sums of ∂b' and K̄ ⊙ dK̄ (fp32 [kVecThreads / K][K] each)
    static constexpr size_t sg_off = r_off + 6 * kChunk * 4 + 16;
    static constexpr size_t bytes = sg_off + std::max(size_t(8) * K * 4, 2 * size_t(kVecThreads) * 4);
    // With the gate activation in the kernel, one more fp32 [kChunk][LDF] tile past `bytes`: each gate
    // input plus dt_bias, kept from the gate sums for dg's derivatives (bytes_gated is then launched).
    // Read again from memory, row after row behind dg's stores, those inputs had cost the kernel ~20%
    // (session 18, ncu); staged into registers they spilled (the kernel is at its register cap).
    static constexpr size_t zg_off = bytes;
    static constexpr size_t bytes_gated = zg_off + size_t(kChunk) * LDF * 4;
    // after the group, [dl_off, r_off) is store_dq_dk's (q̂, k̂ stay for it)
    static_assert(dl_off + dq_dk_stage_bytes(K) <= r_off, "bwd vec: the dq/dk staging does not fit");
    static_assert(bytes_gated <= 227 * 1024, "bwd vec: shared memory over the 227 KiB of an SM");
};

// A B fragment (k rows 2t, 2t+1 | 2t+8, 2t+9 of one column) as two bf16 fragments, hi + lo, so that
// the decay-scaled operand keeps ~16 bits: the row-side and column-side products of one pair must
// cancel in Σ_i ∂b_i (the reverse cumulative sum that gives dg), and a single bf16 rounding on each
// side left 2^-9 of Σ|dP_ij P_ij| there (seen: dA_log 5% off on the H100 with in-kernel gates).
struct SplitB {
    uint32_t hi[2], lo[2];
};
__device__ __forceinline__ SplitB split_b(float x0, float x1, float x8, float x9) {
    SplitB b;
    const float v[4] = {x0, x1, x8, x9};
    float r[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) r[e] = v[e] - __bfloat162float(__float2bfloat16(v[e]));
    b.hi[0] = pack_bf16(v[0], v[1]);
    b.hi[1] = pack_bf16(v[2], v[3]);
    b.lo[0] = pack_bf16(r[0], r[1]);
    b.lo[1] = pack_bf16(r[2], r[3]);
    return b;
}
__device__ __forceinline__ void mma16_split(float (&d)[4], const uint32_t (&a)[4], const SplitB& b) {
    mma16(d, a, b.hi, __nv_bfloat16());
    mma16(d, a, b.lo, __nv_bfloat16());
}

template <Update Up, int K>
__global__ void __launch_bounds__(kVecThreads, 1) chunk_bwd_vec_kernel(const Params p) {
    using E = __nv_bfloat16;
    using L = VecLayout<Up, K>;
    constexpr bool kDelta = Up == Update::Delta;
    constexpr int LDK = L::LDK, LDF = L::LDF, LDC = L::LDC;
    constexpr int NTK = K / (8 * col_groups(kVecThreads));  // n-tiles of a warp's slice of the key columns
    extern __shared__ float4 smem_f4[];
    char* sm = reinterpret_cast<char*>(smem_f4);
    E* Qs = reinterpret_cast<E*>(sm + L::q_off);
    E* Ks = reinterpret_cast<E*>(sm + L::k_off);
    float* Dl = reinterpret_cast<float*>(sm + L::dl_off);
    float* Db = reinterpret_cast<float*>(sm + L::db_off);
    float* Kb = reinterpret_cast<float*>(sm + L::kb_off);
    float* St = reinterpret_cast<float*>(sm + L::st_off);
    E* dPb = reinterpret_cast<E*>(sm + L::ep_off);
    E* dDb = reinterpret_cast<E*>(sm + L::ed_off);
    float* dpd = reinterpret_cast<float*>(sm + L::r_off);
    float* betas = dpd + kChunk;
    float* braw = betas + kChunk;
    float* dbt = braw + kChunk;
    float* inv_norm = dbt + kChunk;                          // [2][64] (normalize_qk_rows)
    int* wide = reinterpret_cast<int*>(inv_norm + 2 * kChunk);  // bit J: S_J < −kSafeSpan in some channel
    float* segD = reinterpret_cast<float*>(sm + L::sg_off);
    float* segK = segD + kVecThreads;
    float* Zg = reinterpret_cast<float*>(sm + L::zg_off);  // gated only: gate input + dt_bias

    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
    const int g = lane >> 2, t = lane & 3, mi = lane >> 3, r8 = lane & 7;
    const int mw = warp & 3, row0 = 16 * mw, kc0 = (warp >> 2) * (K / col_groups(kVecThreads));
    const int chunk = blockIdx.x, h = blockIdx.y;
    const ChunkInfo ci = p.chunks[chunk];
    const int len = ci.len;
    const bool gated = p.gate_act != GateActivation::None;
    auto bf = [](E x) { return __bfloat162float(x); };

    stage_qk_hat<K, LDK, kVecThreads>(Qs, Ks, inv_norm, p, ci, h);
    float dq[1][NTK][4], dk[1][NTK][4];  // rows row0.., key columns kc0.., summed over the group
    zero_acc(dq);
    zero_acc(dk);

    for (int hv = h * p.G; hv < (h + 1) * p.G; ++hv) {
        const size_t slot = size_t(chunk) * p.HV + hv;
        // ---- raw gates into Δ's rows; dP, dD (the first kernel's bf16 operands, 16 bytes a step) and dP's
        // diagonal (fp32); β ----
        load_rows_any<kChunk, K, kVecThreads>(Dl, LDF, p.g, p.g_dt, tok(p.gs, ci.batch, ci.start, hv), p.gs[1], len);
        {
            constexpr int PR = kChunk / 8;  // 16-byte pieces of a row
            const uint4* dPg = reinterpret_cast<const uint4*>(p.v_dp + slot * kChunk * kChunk);
            const uint4* dDg = kDelta ? reinterpret_cast<const uint4*>(p.v_dd + slot * kChunk * kChunk) : nullptr;
            for (int idx = tid; idx < kChunk * PR; idx += kVecThreads) {
                const int i = idx / PR, c = idx % PR;
                *reinterpret_cast<uint4*>(dPb + i * LDC + 8 * c) = dPg[idx];
                if constexpr (kDelta) *reinterpret_cast<uint4*>(dDb + i * LDC + 8 * c) = dDg[idx];
            }
            if (tid < kChunk) dpd[tid] = p.v_dpd[slot * kChunk + tid];
        }
        if (tid < kChunk) {
            float raw = 0.f, bv = 0.f;
            if (kDelta && tid < len) {
                raw = load_any(p.beta, p.beta_dt, tok(p.bs, ci.batch, ci.start + tid, hv));
                bv = beta_value(p.beta_act, raw);
            }
            braw[tid] = raw;
            betas[tid] = bv;
            dbt[tid] = 0.f;
        }
        if (tid == 0) *wide = 0;
        __syncthreads();
        // ---- per channel and 16-row block (one thread each): the activation, compensated sums from the
        // block's first token → Δ (as the forward's prepare forms them); then R_0 and S_I from the
        // blocks' first tokens and sums (one thread per channel over 64 tokens left three quarters of
        // the block waiting at the barrier) ----
        float* bfirst = segD;         // [4][K] log decay of each block's first token
        float* bsum = bfirst + 4 * K;  // [4][K] the sum over its other tokens
        if (tid < 4 * K) {
            const int c = tid % K, I = tid / K;
            float dtb = 0.f, ea = 0.f;
            if (gated) {
                dtb = static_cast<const float*>(p.dt_bias)[hv * p.dtb_s + c];
                ea = expf(static_cast<const float*>(p.A_log)[hv * p.alog_s]);
            }
            float run = 0.f, lo = 0.f, first = 0.f;
#pragma unroll 1
            for (int ii = 0; ii < 16; ++ii) {
                const int i = 16 * I + ii;
                float gl = 0.f;
                if (i < len) {
                    const float x = Dl[i * LDF + c];
                    if (gated) {
                        Zg[i * LDF + c] = x + dtb;
                        gl = fast_gate_log_decay(p.gate_act, x + dtb, ea, p.lower_bound);  // as prepare's
                    } else {
                        gl = x;
                    }
                }
                if (ii == 0) first = gl;
                else compensated_add(run, lo, gl);
                Dl[i * LDF + c] = run + lo;  // Δ_i = b_i − R_I
            }
            bfirst[I * K + c] = first;
            bsum[I * K + c] = run + lo;
        }
        __syncthreads();
        if (tid < 4 * K) {
            const int c = tid % K, I = tid / K;
            const float sI = bsum[I * K + c] + (I < 3 ? bfirst[(I + 1) * K + c] : 0.f);  // R_{I+1} − R_I
            St[(I + 1) * K + c] = sI;
            if (I == 0) St[c] = bfirst[c];
            if (sI < -kSafeSpan) atomicOr(wide, 1 << I);
        }
        __syncthreads();
        const int wbits = *wide;
        const bool wide_here = (wbits >> mw) & 1;

        float a1[1][NTK][4], a2[1][NTK][4];
        // ---- row side, rows I = mw: a1 = Σ_{j<i} dP_ij k̂_j e^{b_i − b_j}, a2 the same with dD ----
        {
            const int I = mw;
            zero_acc(a1);
            zero_acc(a2);
            for (int J = 0; J <= I; ++J) {
                if (J == I && wide_here) break;
                uint32_t ap[4], ad[4];
                ldmatrix_x4(ap, dPb + (16 * I + (mi & 1) * 8 + r8) * LDC + 16 * J + (mi >> 1) * 8);
                if constexpr (kDelta) ldmatrix_x4(ad, dDb + (16 * I + (mi & 1) * 8 + r8) * LDC + 16 * J + (mi >> 1) * 8);
#pragma unroll
                for (int nt = 0; nt < NTK; ++nt) {
                    const int c = kc0 + 8 * nt + g;
                    float off = 0.f;  // R_I − R_J
                    for (int m = J; m < I; ++m) off += St[(m + 1) * K + c];
                    const int j0 = 16 * J + 2 * t;
                    auto y = [&](int j) { return bf(Ks[j * LDK + c]) * __expf(off - Dl[j * LDF + c]); };
                    const SplitB b = split_b(y(j0), y(j0 + 1), y(j0 + 8), y(j0 + 9));
                    mma16_split(a1[0][nt], ap, b);
                    if constexpr (kDelta) mma16_split(a2[0][nt], ad, b);
                }
            }
            for_each_acc(a1, [&](int r, int cc, float& x) {
                const int i = row0 + r, c = kc0 + cc, n = cc >> 3, e = (r >> 3) * 2 + (cc & 1);
                const float di = Dl[i * LDF + c], f = __expf(di);
                float y = kDelta ? a2[0][n][e] * f : 0.f;
                x *= f;
                if (wide_here) {
                    for (int j = 16 * I; j < i; ++j) {
                        const float kj = bf(Ks[j * LDK + c]) * __expf(di - Dl[j * LDF + c]);
                        x += bf(dPb[i * LDC + j]) * kj;
                        if constexpr (kDelta) y += bf(dDb[i * LDC + j]) * kj;
                    }
                }
                dq[0][n][e] += x;
                dk[0][n][e] += y;
                Db[i * LDF + c] = bf(Qs[i * LDK + c]) * x + bf(Ks[i * LDK + c]) * y;
            });
        }
        // ---- column side, rows J = mw: a1 = Σ_{i>j} dP_ij q̂_i e^{b_i − b_j}, a2 = the same with dD, k̂ ----
        {
            const int J = mw;
            zero_acc(a1);
            zero_acc(a2);
            for (int I = J; I < 4; ++I) {
                if (I == J && wide_here) continue;
                uint32_t ap[4], ad[4];
                ldmatrix_x4_trans(ap, dPb + 16 * J + (mi & 1) * 8 + (16 * I + (mi >> 1) * 8 + r8) * LDC);
                if constexpr (kDelta) ldmatrix_x4_trans(ad, dDb + 16 * J + (mi & 1) * 8 + (16 * I + (mi >> 1) * 8 + r8) * LDC);
#pragma unroll
                for (int nt = 0; nt < NTK; ++nt) {
                    const int c = kc0 + 8 * nt + g;
                    float off = I == J ? -St[(J + 1) * K + c] : 0.f;  // R_I − R_{J+1}
                    for (int m = J + 1; m < I; ++m) off += St[(m + 1) * K + c];
                    const int i0 = 16 * I + 2 * t, rows[4] = {i0, i0 + 1, i0 + 8, i0 + 9};
                    float ex[4];
#pragma unroll
                    for (int e = 0; e < 4; ++e) ex[e] = __expf(off + Dl[rows[e] * LDF + c]);
                    auto x = [&](const E* X, int e) { return bf(X[rows[e] * LDK + c]) * ex[e]; };
                    mma16_split(a1[0][nt], ap, split_b(x(Qs, 0), x(Qs, 1), x(Qs, 2), x(Qs, 3)));
                    if constexpr (kDelta) mma16_split(a2[0][nt], ad, split_b(x(Ks, 0), x(Ks, 1), x(Ks, 2), x(Ks, 3)));
                }
            }
            for_each_acc(a1, [&](int r, int cc, float& x) {
                const int j = row0 + r, c = kc0 + cc, n = cc >> 3, e = (r >> 3) * 2 + (cc & 1);
                const float dj = Dl[j * LDF + c], f = __expf(St[(J + 1) * K + c] - dj);
                float y = kDelta ? a2[0][n][e] * f : 0.f;
                x *= f;
                if (wide_here) {
                    for (int i = j + 1; i < 16 * J + 16; ++i) {
                        const float ex = __expf(Dl[i * LDF + c] - dj);
                        x += bf(dPb[i * LDC + j]) * bf(Qs[i * LDK + c]) * ex;
                        if constexpr (kDelta) y += bf(dDb[i * LDC + j]) * bf(Ks[i * LDK + c]) * ex;
                    }
                }
                dk[0][n][e] += x + y;
                Db[j * LDF + c] -= bf(Ks[j * LDK + c]) * (x + y);
            });
        }
        // ---- the K-wide terms: e^{b} ⊙ dO S0ᵀ, −β e^{b} ⊙ M, e^{b_C − b} ⊙ X dS_Cᵀ; dP's diagonal ----
        {
            const size_t at = slot * kChunk * K;
            const __nv_bfloat16* gq = p.v_dqg + at;
            const __nv_bfloat16* gk = p.v_dkb + at;
            const __nv_bfloat16* gm = kDelta ? p.v_m + at : nullptr;
            // two columns a step (paired loads of the hand-over; per element its loads' latency was ~10%
            // of the kernel's stall samples)
            float sb[2] = {0.f, 0.f};
            for_each_acc_pair(dq, [&](int r, int cc, float& xq0, float& xq1) {
                const int i = row0 + r, c = kc0 + cc;
                float* xk = &dk[0][cc >> 3][(r >> 3) * 2];
                const float2 q2 = load_pair(Qs + i * LDK + c), k2 = load_pair(Ks + i * LDK + c);
                const float2 d2 = *reinterpret_cast<const float2*>(Dl + i * LDF + c);
                const float2 gq2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(gq + i * K + c));
                const float2 gk2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(gk + i * K + c));
                float2 gm2 = make_float2(0.f, 0.f);
                if constexpr (kDelta) gm2 = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(gm + i * K + c));
                float dbv[2], kbv[2];
                auto one = [&](int e, float& xq, float& xkk, float qv, float kv, float d, float gqv, float gkv, float gmv) {
                    float Rb = St[c + e], Eb = 0.f;  // R_I and b_C − R_I, sums of one sign
#pragma unroll
                    for (int m = 0; m < 4; ++m) {
                        const float sI = St[(m + 1) * K + c + e];
                        if (m < mw) Rb += sI;
                        else Eb += sI;
                    }
                    const float eb = __expf(Rb + d), ebar = __expf(Eb - d);
                    const float vq = gqv * eb, vk = gkv * ebar;
                    dbv[e] = qv * vq;
                    xq += vq + dpd[i] * kv;
                    xkk += vk + dpd[i] * qv;
                    if constexpr (kDelta) {
                        const float m = gmv * eb;
                        xkk -= betas[i] * m;
                        dbv[e] -= betas[i] * kv * m;
                        sb[r >> 3] += kv * m;
                    }
                    kbv[e] = kv * vk;
                };
                one(0, xq0, xk[0], q2.x, k2.x, d2.x, gq2.x, gk2.x, gm2.x);
                one(1, xq1, xk[1], q2.y, k2.y, d2.y, gq2.y, gk2.y, gm2.y);
                float2* db2 = reinterpret_cast<float2*>(Db + i * LDF + c);
                const float2 old = *db2;
                *db2 = make_float2(old.x + dbv[0], old.y + dbv[1]);
                *reinterpret_cast<float2*>(Kb + i * LDF + c) = make_float2(kbv[0], kbv[1]);
            });
            if constexpr (kDelta) {
                // dβ_i −= ⟨k̂_i ⊙ e^{b_i}, M_i⟩ (the K⊙γ inside Y = V − (K⊙γ) S0)
                float minus[2] = {-sb[0], -sb[1]};
                add_fragment_row_sums(minus, dbt, row0);
            }
        }
        __syncthreads();  // ∂b', K̄ ⊙ dK̄ and dβ complete

        if (kDelta && p.dbeta && tid < len)
            p.dbeta[tok(p.dbs, ci.batch, ci.start + tid, hv)] =
                (p.v_db[slot * kChunk + tid] + dbt[tid]) * beta_derivative(p.beta_act, braw[tid]);
        // ---- dg, and the per-head parameter sums: every thread, NS row segments of RS rows per channel
        // (one thread per channel left three quarters of the block waiting at the barrier: ncu, session 5).
        // dg_t = e^{b_C} Σ_e S0 ⊙ dS_C + Σ_{i≥t} ∂b'_i + Σ_{i<t} K̄_i ⊙ dK̄_i, the sums over the other
        // segments first, then along the thread's own rows.
        {
            constexpr int NS = kVecThreads / K, RS = kChunk / NS;
            static_assert(kVecThreads % K == 0 && kChunk % NS == 0, "bwd vec: dg segments");
            const int c = tid % K, sg = tid / K, i0 = sg * RS;
            float sd = 0.f, sk = 0.f;
#pragma unroll 4
            for (int i = i0; i < i0 + RS; ++i) {
                sd += Db[i * LDF + c];
                sk += Kb[i * LDF + c];
            }
            segD[sg * K + c] = sd;
            segK[sg * K + c] = sk;
            __syncthreads();
            float bC = St[c];
#pragma unroll
            for (int m = 0; m < 4; ++m) bC += St[(m + 1) * K + c];
            float s = 0.f, run = 0.f;  // Σ ∂b' of the later segments, Σ K̄ ⊙ dK̄ of the earlier ones
            for (int m = NS - 1; m > sg; --m) s += segD[m * K + c];
            for (int m = 0; m < sg; ++m) run += segK[m * K + c];
            for (int i = i0; i < i0 + RS; ++i) {
                const float x = Kb[i * LDF + c];
                Kb[i * LDF + c] = run;
                run += x;
            }
            const float c0 = __expf(bC) * p.v_sd[slot * K + c];  // the state's own decay over the chunk
            const float ea = gated ? expf(static_cast<const float*>(p.A_log)[hv * p.alog_s]) : 0.f;
            float s_dx = 0.f, s_alog = 0.f;
            for (int i = i0 + RS - 1; i >= i0; --i) {
                s += Db[i * LDF + c];
                if (i >= len) continue;
                float dgi = c0 + s + Kb[i * LDF + c];
                if (gated) {
                    float d_dx = 1.f, d_dalog = 0.f;
                    fast_gate_derivatives(p.gate_act, Zg[i * LDF + c], ea, p.lower_bound, &d_dx, &d_dalog);
                    s_alog += dgi * d_dalog;
                    dgi *= d_dx;
                }
                s_dx += dgi;
                if (p.dg) p.dg[tok(p.dgs, ci.batch, ci.start + i, hv) + c] = dgi;
            }
            if (gated) {
                __syncthreads();  // every segment sum is read: segD takes the per-thread dt_bias sums
                segD[sg * K + c] = s_dx;
                s_alog = lane_group_sum<32>(s_alog);
                if (lane == 0) atomicAdd(p.params_acc + p.HV + hv, double(s_alog));
                __syncthreads();
                if (sg == 0) {
                    float t = 0.f;
                    for (int m = 0; m < NS; ++m) t += segD[m * K + c];
                    atomicAdd(p.params_acc + 2 * p.HV + int64_t(hv) * K + c, double(t));
                }
            }
        }
        __syncthreads();  // the chunk's shared memory is the next value head's
    }

    store_dq_dk<K, LDK, kVecThreads, 32>(dq, dk, reinterpret_cast<float*>(sm + L::dl_off), Qs, Ks, inv_norm, p, ci, h);
}

}  // namespace bwd

template <Update Up, int K, int V>
void launch_backward_mma_vector_kv(const bwd::Params& p, const Stage3Views& x, const char* op) {
    launch_backward_mma_kv<Up, true, K, V>(p, x, op);
    using L = bwd::VecLayout<Up, K>;
    const size_t smem = p.gate_act != GateActivation::None ? L::bytes_gated : L::bytes;
    raise_smem_limit<bwd::chunk_bwd_vec_kernel<Up, K>>(L::bytes_gated, op);  // the limit, once for both
    bwd::chunk_bwd_vec_kernel<Up, K><<<dim3(p.n_chunks, p.H), bwd::kVecThreads, smem, launch_stream()>>>(p);
    check_cuda(cudaGetLastError(), op, "chunk_bwd_vec launch");
}

// Stage 3 on tensor cores for bf16 inputs with vector decay (instantiated in bwd_mma_vec_<update>.cu).
// Params::v_* must point at n_chunks · HV of the hand-over blocks (backward.cu lays them out).
template <Update Up>
void launch_backward_mma_vector(const bwd::Params& p, const Stage3Views& x, const char* op) {
    if (p.K == 64) {
        if (p.V == 64) return launch_backward_mma_vector_kv<Up, 64, 64>(p, x, op);
        return launch_backward_mma_vector_kv<Up, 64, 128>(p, x, op);
    }
    if (p.V == 64) return launch_backward_mma_vector_kv<Up, 128, 64>(p, x, op);
    return launch_backward_mma_vector_kv<Up, 128, 128>(p, x, op);
}

}  // namespace hla::linear::cuda
