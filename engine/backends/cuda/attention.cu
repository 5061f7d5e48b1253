// Fused causal attention kernels (flash-attention forward, FlashAttention-2 backward) on bf16
// WMMA tensor-core tiles with fp32 accumulation. Layout, masking and block folding follow
// engine/backends/cpu/attention.cpp, the reference the tests compare against.
//
// Every WMMA accumulator whose rows need per-row work (softmax statistics, rescaling, masking,
// bounds-checked stores) goes through shared memory: the register layout of a WMMA fragment is
// unspecified, shared memory's is not. Padded rows (bf16 +8, fp32 +4 elements) keep fragment
// loads off repeated banks and satisfy WMMA's ldm and 32-byte pointer alignment rules.
#include "engine/backends/cuda/attention.hpp"

#include <mma.h>

#include <climits>
#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

#include "engine/backends/cuda/check.hpp"
#include "engine/backends/cuda/warp_reduce.cuh"

namespace px::cuda {
namespace {

namespace wmma = nvcuda::wmma;
using bf16 = __nv_bfloat16;
using FragA = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::row_major>;
using FragAT = wmma::fragment<wmma::matrix_a, 16, 16, 16, bf16, wmma::col_major>;
using FragB = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::row_major>;
using FragBT = wmma::fragment<wmma::matrix_b, 16, 16, 16, bf16, wmma::col_major>;
using FragC = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kPadH = 8;  // bf16 row padding, 16 bytes
constexpr int kPadF = 4;  // fp32 row padding, 16 bytes

constexpr std::size_t align_up(std::size_t n) { return (n + 127) / 128 * 128; }
constexpr std::size_t max_of(std::size_t a, std::size_t b) { return a > b ? a : b; }

// Keys 0 .. visible-1 of the block are at or before query i (a prefix: positions ascend).
__device__ __forceinline__ int visible(long long off, int i, int sk) {
  const long long n = off + i + 1;
  return n <= 0 ? 0 : (n >= sk ? sk : static_cast<int>(n));
}

// dst[r][c] (row pitch DP + kPadH) = src[((r0 + r) * b + j) * ld + c] for r0 + r < rows and c < d,
// zero elsewhere: padded rows and columns then add exactly nothing to any product, and never
// bring uninitialised (possibly NaN) bits into one.
template <int ROWS, int DP, int NT, bool VEC>
__device__ __forceinline__ void load_tile(bf16* dst, const bf16* src, long long ld, int b, int j, int r0, int rows,
                                          int d) {
  constexpr int kLd = DP + kPadH;
  if constexpr (VEC) {
    constexpr int kChunks = DP / 8;  // 16-byte pieces of a row
    for (int e = static_cast<int>(threadIdx.x); e < ROWS * kChunks; e += NT) {
      const int r = e / kChunks, c = e % kChunks * 8;
      uint4 val = make_uint4(0u, 0u, 0u, 0u);
      if (r0 + r < rows)
        val = *reinterpret_cast<const uint4*>(src + (static_cast<long long>(r0 + r) * b + j) * ld + c);
      *reinterpret_cast<uint4*>(dst + r * kLd + c) = val;
    }
  } else {
    for (int e = static_cast<int>(threadIdx.x); e < ROWS * DP; e += NT) {
      const int r = e / DP, c = e % DP;
      bf16 val = __float2bfloat16(0.0f);
      if (r0 + r < rows && c < d) val = src[(static_cast<long long>(r0 + r) * b + j) * ld + c];
      dst[r * kLd + c] = val;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Forward: one thread block per (query tile of BM = 16 * WARPS rows, sequence, head); warp w owns
// query rows 16w .. 16w+15 of the tile end to end (scores, softmax state, out rows), so the only
// block-wide barriers are around the shared key/value tile loads.

struct FwdParams {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  long long ldq, ldk, ldv;
  float* out;
  float* lse;
  bf16* out_bf16;
  int b, heads, per_group, d, sq, sk;
  long long off;     // q_pos0 - k_pos0: query i sees key t iff t <= off + i
  float scale_log2;  // 1/sqrt(d) * log2(e): the softmax runs in base 2
  bool first;
};

template <int DP, int WARPS, int BN>
struct FwdTile {
  static constexpr int BM = 16 * WARPS, NT = 32 * WARPS;
  static constexpr int LDH = DP + kPadH;  // bf16 q, k, v rows
  static constexpr int LDS = BN + kPadF;  // fp32 scores
  static constexpr int LDP = BN + kPadH;  // bf16 probabilities
  static constexpr int LDO = DP + kPadF;  // fp32 running out
  // Scores and probabilities alias the q tile: q moves into registers before the first score.
  static constexpr std::size_t off_s = 0;
  static constexpr std::size_t off_p = align_up(std::size_t(BM) * LDS * 4);
  static constexpr std::size_t off_k =
      align_up(max_of(std::size_t(BM) * LDH * 2, off_p + std::size_t(BM) * LDP * 2));
  static constexpr std::size_t off_v = off_k + align_up(std::size_t(BN) * LDH * 2);
  static constexpr std::size_t off_o = off_v + align_up(std::size_t(BN) * LDH * 2);
  static constexpr std::size_t off_row = off_o + align_up(std::size_t(BM) * LDO * 4);
  static constexpr std::size_t bytes = off_row + align_up(std::size_t(BM) * 4);
};

template <int DP, int WARPS, int BN, bool VEC>
__global__ void __launch_bounds__(32 * WARPS) attention_forward_kernel(FwdParams p) {
  using T = FwdTile<DP, WARPS, BN>;
  constexpr int BM = T::BM, NT = T::NT, HALF = BN / 2;
  static_assert(DP % 16 == 0 && BN % 32 == 0 && (HALF & (HALF - 1)) == 0, "tile shape");
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* qs = reinterpret_cast<bf16*>(smem);
  float* ss = reinterpret_cast<float*>(smem + T::off_s);
  bf16* ps = reinterpret_cast<bf16*>(smem + T::off_p);
  bf16* ks = reinterpret_cast<bf16*>(smem + T::off_k);
  bf16* vs = reinterpret_cast<bf16*>(smem + T::off_v);
  float* os = reinterpret_cast<float*>(smem + T::off_o);
  float* row_f = reinterpret_cast<float*>(smem + T::off_row);

  const int bh = p.b * p.heads;
  const int jh = static_cast<int>(blockIdx.x % static_cast<unsigned>(bh));
  const int n_qt = (p.sq + BM - 1) / BM;
  // Causal work grows with the query position: the longest tiles go out in the first wave.
  const int qt = n_qt - 1 - static_cast<int>(blockIdx.x / static_cast<unsigned>(bh));
  const int j = jh / p.heads, h = jh % p.heads, g = h / p.per_group;
  const int i0 = qt * BM;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const long long hd = static_cast<long long>(p.heads) * p.d;
  const long long lse0 = static_cast<long long>(jh) * p.sq;

  // Keys [0, n_max) are visible to some query of the tile; tiles past it are skipped outright.
  const int n_max = visible(p.off, (i0 + BM < p.sq ? i0 + BM : p.sq) - 1, p.sk);
  if (!p.first && n_max == 0 && p.out_bf16 == nullptr) return;  // nothing changes, nothing to convert

  load_tile<BM, DP, NT, VEC>(qs, p.q + static_cast<long long>(h) * p.d, p.ldq, p.b, j, i0, p.sq, p.d);
  for (int e = static_cast<int>(threadIdx.x); e < BM * DP; e += NT) {
    const int r = e / DP, c = e % DP;
    float val = 0.0f;
    if (!p.first && i0 + r < p.sq && c < p.d)
      val = p.out[(static_cast<long long>(i0 + r) * p.b + j) * hd + static_cast<long long>(h) * p.d + c];
    os[r * T::LDO + c] = val;
  }
  __syncthreads();

  FragA qf[DP / 16];
#pragma unroll
  for (int kk = 0; kk < DP / 16; ++kk) wmma::load_matrix_sync(qf[kk], qs + warp * 16 * T::LDH + kk * 16, T::LDH);

  // Lanes 2r and 2r+1 each own half the columns of the warp's row r and both hold its state:
  // m (running max, base 2) and l (running sum relative to m).
  const int r = lane >> 1, half = lane & 1;
  const int row = warp * 16 + r;
  const int i = i0 + row;
  const int nv = i < p.sq ? visible(p.off, i, p.sk) : 0;
  float m = -INFINITY, l = 0.0f;
  bool seen = false;
  if (!p.first && i < p.sq) {
    // The blocks folded in so far weigh in as one more key, with score lse and value out.
    const float prev = p.lse[lse0 + i];
    if (prev > -INFINITY) {
      m = prev * kLog2e;
      l = 1.0f;
    }
  }
  const int w_first = i0 + warp * 16;
  const int w_nv = w_first < p.sq ? visible(p.off, (w_first + 15 < p.sq ? w_first + 15 : p.sq - 1), p.sk) : 0;
  float* sw = ss + warp * 16 * T::LDS;
  bf16* pw = ps + warp * 16 * T::LDP;
  float* ow = os + warp * 16 * T::LDO;

  for (int t0 = 0; t0 < n_max; t0 += BN) {
    __syncthreads();  // every warp is done with the previous k, v tile (and with q, which ss aliases)
    load_tile<BN, DP, NT, VEC>(ks, p.k + static_cast<long long>(g) * p.d, p.ldk, p.b, j, t0, p.sk, p.d);
    load_tile<BN, DP, NT, VEC>(vs, p.v + static_cast<long long>(g) * p.d, p.ldv, p.b, j, t0, p.sk, p.d);
    __syncthreads();
    if (t0 >= w_nv) continue;  // no row of this warp sees a key of the tile: its state stands

#pragma unroll
    for (int n = 0; n < BN / 16; ++n) {
      FragC acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < DP / 16; ++kk) {
        FragBT kf;  // k^T: element (c, t) of the product is ks[t][c]
        wmma::load_matrix_sync(kf, ks + n * 16 * T::LDH + kk * 16, T::LDH);
        wmma::mma_sync(acc, qf[kk], kf, acc);
      }
      wmma::store_matrix_sync(sw + n * 16, acc, T::LDS, wmma::mem_row_major);
    }
    __syncwarp();

    // Online softmax. Each lane walks its half row starting at a lane-dependent column, so the
    // 32 lanes read 32 different banks at every step.
    float s[HALF];
    float mt = -INFINITY;
#pragma unroll
    for (int c = 0; c < HALF; ++c) {
      const int col = half * HALF + ((c + lane) & (HALF - 1));
      const float x = sw[r * T::LDS + col] * p.scale_log2;
      s[c] = t0 + col < nv ? x : -INFINITY;
      mt = fmaxf(mt, s[c]);
    }
    mt = fmaxf(mt, __shfl_xor_sync(0xffffffffu, mt, 1));
    const float m_new = fmaxf(m, mt);
    // A row that has seen no key yet keeps weight 0 instead of exp2(-inf - -inf) = NaN.
    const float base = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = exp2f(m - base);
    float psum = 0.0f;
#pragma unroll
    for (int c = 0; c < HALF; ++c) {
      const int col = half * HALF + ((c + lane) & (HALF - 1));
      const float pv = exp2f(s[c] - base);
      psum += pv;
      pw[r * T::LDP + col] = __float2bfloat16(pv);
    }
    psum += __shfl_xor_sync(0xffffffffu, psum, 1);
    l = l * alpha + psum;
    m = m_new;
    seen = seen || mt > -INFINITY;
    if (half == 0) row_f[row] = alpha;
    __syncwarp();

    for (int e = lane; e < 16 * DP; e += 32) ow[e / DP * T::LDO + e % DP] *= row_f[warp * 16 + e / DP];
    __syncwarp();

    FragA pf[BN / 16];
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) wmma::load_matrix_sync(pf[kk], pw + kk * 16, T::LDP);
#pragma unroll
    for (int n = 0; n < DP / 16; ++n) {
      FragC acc;
      wmma::load_matrix_sync(acc, ow + n * 16, T::LDO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        FragB vf;
        wmma::load_matrix_sync(vf, vs + kk * 16 * T::LDH + n * 16, T::LDH);
        wmma::mma_sync(acc, pf[kk], vf, acc);
      }
      wmma::store_matrix_sync(ow + n * 16, acc, T::LDO, wmma::mem_row_major);
    }
    __syncwarp();
  }

  // Per row: 1/l where the block changed it, 0 where `first` resets it, -1 where it stands.
  if (half == 0) {
    row_f[row] = seen ? 1.0f / l : (p.first ? 0.0f : -1.0f);
    if (i < p.sq && (seen || p.first)) p.lse[lse0 + i] = seen ? (m + log2f(l)) * kLn2 : -INFINITY;
  }
  __syncwarp();
  for (int e = lane; e < 16 * DP; e += 32) {
    const int rr = e / DP, cc = e % DP, ii = w_first + rr;
    if (ii >= p.sq || cc >= p.d) continue;
    const float f = row_f[warp * 16 + rr];
    const float o = ow[rr * T::LDO + cc];
    const float val = f > 0.0f ? o * f : (f == 0.0f ? 0.0f : o);
    const long long at = (static_cast<long long>(ii) * p.b + j) * hd + static_cast<long long>(h) * p.d + cc;
    if (f >= 0.0f) p.out[at] = val;
    if (p.out_bf16 != nullptr) p.out_bf16[at] = __float2bfloat16(val);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: one thread block per (key tile of BN = 16 * WARPS keys, sequence, head), looping over
// the query tiles that see any of its keys. Warp w owns key rows 16w .. 16w+15: it holds their dk
// and dv in accumulator fragments for the whole loop and computes their rows of P^T and dS^T;
// the dq tile, which needs every warp's dS^T, is a block-wide product added with atomics.

struct BwdParams {
  const bf16* q;
  const bf16* k;
  const bf16* v;
  long long ldq, ldk, ldv;
  const float* lse;
  const float* delta;
  const bf16* dout;
  float* dq;
  float* dk;
  float* dv;
  long long ldgq, ldgk, ldgv;
  int b, heads, per_group, d, sq, sk;
  long long off;
  float scale, scale_log2;
  bool exclusive;  // one head per key/value group: a block owns its dk, dv rows outright
};

template <int DP, int WARPS, int BM>
struct BwdTile {
  static constexpr int BN = 16 * WARPS, NT = 32 * WARPS;
  static constexpr int LDH = DP + kPadH;  // bf16 k, v, q, dout rows
  static constexpr int LDT = BM + kPadF;  // fp32 S^T, then dP^T: [BN][BM]
  static constexpr int LDP = BM + kPadH;  // bf16 P^T, then dS^T: [BN][BM]
  static constexpr int LDQ = DP + kPadF;  // fp32 dq tile [BM][DP], aliasing S^T
  static constexpr std::size_t off_k = 0;
  static constexpr std::size_t off_v = off_k + align_up(std::size_t(BN) * LDH * 2);
  static constexpr std::size_t off_q = off_v + align_up(std::size_t(BN) * LDH * 2);
  static constexpr std::size_t off_do = off_q + align_up(std::size_t(BM) * LDH * 2);
  static constexpr std::size_t off_f = off_do + align_up(std::size_t(BM) * LDH * 2);
  static constexpr std::size_t off_p =
      off_f + align_up(max_of(std::size_t(BN) * LDT * 4, std::size_t(BM) * LDQ * 4));
  static constexpr std::size_t off_row = off_p + align_up(std::size_t(BN) * LDP * 2);
  static constexpr std::size_t bytes = off_row + align_up(std::size_t(BM) * 2 * 4);
};

// acc[n] (16 key rows x DP) += into dst rows t0 .. t0+15, through the warp's 16 x 16 staging.
template <int DP, int LDT>
__device__ __forceinline__ void add_key_rows(FragC (&acc)[DP / 16], float* stage, float* dst, long long ld, int b,
                                             int j, int t0, int sk, int d, long long col0, bool exclusive,
                                             int lane) {
#pragma unroll
  for (int n = 0; n < DP / 16; ++n) {
    wmma::store_matrix_sync(stage, acc[n], LDT, wmma::mem_row_major);
    __syncwarp();
    for (int e = lane; e < 256; e += 32) {
      const int rr = e / 16, c = n * 16 + e % 16;
      if (t0 + rr < sk && c < d) {
        float* at = dst + (static_cast<long long>(t0 + rr) * b + j) * ld + col0 + c;
        const float val = stage[rr * LDT + e % 16];
        if (exclusive)
          *at += val;
        else
          atomicAdd(at, val);
      }
    }
    __syncwarp();
  }
}

template <int DP, int WARPS, int BM, bool VEC>
__global__ void __launch_bounds__(32 * WARPS) attention_backward_kernel(BwdParams p) {
  using T = BwdTile<DP, WARPS, BM>;
  constexpr int BN = T::BN, NT = T::NT, HALF = BM / 2;
  static_assert(DP % 16 == 0 && BM % 32 == 0 && (HALF & (HALF - 1)) == 0, "tile shape");
  extern __shared__ __align__(128) unsigned char smem[];
  bf16* ks = reinterpret_cast<bf16*>(smem + T::off_k);
  bf16* vs = reinterpret_cast<bf16*>(smem + T::off_v);
  bf16* qs = reinterpret_cast<bf16*>(smem + T::off_q);
  bf16* dos = reinterpret_cast<bf16*>(smem + T::off_do);
  float* fs = reinterpret_cast<float*>(smem + T::off_f);
  bf16* pt = reinterpret_cast<bf16*>(smem + T::off_p);
  float* lse2 = reinterpret_cast<float*>(smem + T::off_row);
  float* dl = lse2 + BM;

  const int bh = p.b * p.heads;
  const int jh = static_cast<int>(blockIdx.x % static_cast<unsigned>(bh));
  // Key tile 0 is seen by the most queries: the longest blocks go out in the first wave.
  const int kt0 = static_cast<int>(blockIdx.x / static_cast<unsigned>(bh)) * BN;
  const int j = jh / p.heads, h = jh % p.heads, g = h / p.per_group;
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  const long long hd = static_cast<long long>(p.heads) * p.d;
  const long long row0 = static_cast<long long>(jh) * p.sq;

  // Query i sees key kt0 iff i >= kt0 - off; earlier query tiles see no key of this tile.
  const long long first_q = kt0 - p.off > 0 ? kt0 - p.off : 0;
  if (first_q >= p.sq) return;
  const int i_begin = static_cast<int>(first_q) / BM * BM;

  load_tile<BN, DP, NT, VEC>(ks, p.k + static_cast<long long>(g) * p.d, p.ldk, p.b, j, kt0, p.sk, p.d);
  load_tile<BN, DP, NT, VEC>(vs, p.v + static_cast<long long>(g) * p.d, p.ldv, p.b, j, kt0, p.sk, p.d);

  FragC dk_acc[DP / 16], dv_acc[DP / 16];
#pragma unroll
  for (int n = 0; n < DP / 16; ++n) {
    wmma::fill_fragment(dk_acc[n], 0.0f);
    wmma::fill_fragment(dv_acc[n], 0.0f);
  }

  // Lanes 2r and 2r+1 own halves of the warp's key row r of P^T and dS^T.
  const int r = lane >> 1, half = lane & 1;
  const int t = kt0 + warp * 16 + r;
  const long long t_min_i = t - p.off;  // query i sees key t iff i >= t - off
  float* tw = fs + warp * 16 * T::LDT;
  bf16* pw = pt + warp * 16 * T::LDP;

  for (int i0 = i_begin; i0 < p.sq; i0 += BM) {
    __syncthreads();  // the previous tile's dq atomics have read fs, every product has read qs, dos
    load_tile<BM, DP, NT, VEC>(qs, p.q + static_cast<long long>(h) * p.d, p.ldq, p.b, j, i0, p.sq, p.d);
    load_tile<BM, DP, NT, VEC>(dos, p.dout + static_cast<long long>(h) * p.d, hd, p.b, j, i0, p.sq, p.d);
    for (int e = static_cast<int>(threadIdx.x); e < BM; e += NT) {
      const bool in = i0 + e < p.sq;
      lse2[e] = in ? p.lse[row0 + i0 + e] * kLog2e : 0.0f;
      dl[e] = in ? p.delta[row0 + i0 + e] : 0.0f;
    }
    __syncthreads();

    // S^T = k q^T for the warp's 16 keys.
#pragma unroll 1
    for (int n = 0; n < BM / 16; ++n) {
      FragC acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < DP / 16; ++kk) {
        FragA kf;
        FragBT qf;
        wmma::load_matrix_sync(kf, ks + warp * 16 * T::LDH + kk * 16, T::LDH);
        wmma::load_matrix_sync(qf, qs + n * 16 * T::LDH + kk * 16, T::LDH);
        wmma::mma_sync(acc, kf, qf, acc);
      }
      wmma::store_matrix_sync(tw + n * 16, acc, T::LDT, wmma::mem_row_major);
    }
    __syncwarp();

    // P^T from lse; kept in fp32 registers for dS, rounded to bf16 only as an MMA operand.
    float pr[HALF];
#pragma unroll
    for (int c = 0; c < HALF; ++c) {
      const int col = half * HALF + ((c + lane) & (HALF - 1));
      const int i = i0 + col;
      const bool vis = t < p.sk && i < p.sq && i >= t_min_i;
      pr[c] = vis ? exp2f(tw[r * T::LDT + col] * p.scale_log2 - lse2[col]) : 0.0f;
      pw[r * T::LDP + col] = __float2bfloat16(pr[c]);
    }
    __syncwarp();

    // dv += P^T dout.
#pragma unroll 1
    for (int kk = 0; kk < BM / 16; ++kk) {
      FragA pf;
      wmma::load_matrix_sync(pf, pw + kk * 16, T::LDP);
#pragma unroll
      for (int n = 0; n < DP / 16; ++n) {
        FragB df;
        wmma::load_matrix_sync(df, dos + kk * 16 * T::LDH + n * 16, T::LDH);
        wmma::mma_sync(dv_acc[n], pf, df, dv_acc[n]);
      }
    }

    // dP^T = v dout^T, over S^T, which is spent.
#pragma unroll 1
    for (int n = 0; n < BM / 16; ++n) {
      FragC acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < DP / 16; ++kk) {
        FragA vf;
        FragBT df;
        wmma::load_matrix_sync(vf, vs + warp * 16 * T::LDH + kk * 16, T::LDH);
        wmma::load_matrix_sync(df, dos + n * 16 * T::LDH + kk * 16, T::LDH);
        wmma::mma_sync(acc, vf, df, acc);
      }
      wmma::store_matrix_sync(tw + n * 16, acc, T::LDT, wmma::mem_row_major);
    }
    __syncwarp();  // dP^T is visible, and the dv product has read P^T before dS^T overwrites it

    // dS^T = P^T (dP^T - delta) / sqrt(d), the scale folded in once for both dq and dk.
#pragma unroll
    for (int c = 0; c < HALF; ++c) {
      const int col = half * HALF + ((c + lane) & (HALF - 1));
      pw[r * T::LDP + col] = __float2bfloat16(pr[c] * (tw[r * T::LDT + col] - dl[col]) * p.scale);
    }
    __syncwarp();

    // dk += dS^T q.
#pragma unroll 1
    for (int kk = 0; kk < BM / 16; ++kk) {
      FragA sf;
      wmma::load_matrix_sync(sf, pw + kk * 16, T::LDP);
#pragma unroll
      for (int n = 0; n < DP / 16; ++n) {
        FragB qf;
        wmma::load_matrix_sync(qf, qs + kk * 16 * T::LDH + n * 16, T::LDH);
        wmma::mma_sync(dk_acc[n], sf, qf, dk_acc[n]);
      }
    }
    __syncthreads();  // every warp's dS^T rows are in, and every warp is done with fs as dP^T

    // dq tile (BM x DP) = dS k, fragment (m, n) by warp (m * DP/16 + n) % WARPS, staged over fs.
    for (int f = warp; f < BM / 16 * (DP / 16); f += WARPS) {
      const int fm = f / (DP / 16), fn = f % (DP / 16);
      FragC acc;
      wmma::fill_fragment(acc, 0.0f);
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        FragAT sf;  // dS (query, key) is dS^T stored [key][query]
        FragB kf;
        wmma::load_matrix_sync(sf, pt + kk * 16 * T::LDP + fm * 16, T::LDP);
        wmma::load_matrix_sync(kf, ks + kk * 16 * T::LDH + fn * 16, T::LDH);
        wmma::mma_sync(acc, sf, kf, acc);
      }
      wmma::store_matrix_sync(fs + fm * 16 * T::LDQ + fn * 16, acc, T::LDQ, wmma::mem_row_major);
    }
    __syncthreads();
    for (int e = static_cast<int>(threadIdx.x); e < BM * DP; e += NT) {
      const int rr = e / DP, cc = e % DP;
      if (i0 + rr < p.sq && cc < p.d)
        atomicAdd(p.dq + (static_cast<long long>(i0 + rr) * p.b + j) * p.ldgq + static_cast<long long>(h) * p.d + cc,
                  fs[rr * T::LDQ + cc]);
    }
  }
  __syncthreads();  // the last dq atomics have read fs before the warps stage dk, dv over it

  const int w_t0 = kt0 + warp * 16;
  if (w_t0 >= p.sk) return;
  const long long col0 = static_cast<long long>(g) * p.d;
  add_key_rows<DP, T::LDT>(dv_acc, tw, p.dv, p.ldgv, p.b, j, w_t0, p.sk, p.d, col0, p.exclusive, lane);
  add_key_rows<DP, T::LDT>(dk_acc, tw, p.dk, p.ldgk, p.b, j, w_t0, p.sk, p.d, col0, p.exclusive, lane);
}

// One warp per (sequence, head, query): delta = dout . out over the head's columns.
__global__ void attention_delta_kernel(const float* out, const bf16* dout, float* delta, int b, int heads, int d,
                                       int sq) {
  const long long w = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  if (w >= static_cast<long long>(b) * heads * sq) return;  // whole warps leave together
  const int i = static_cast<int>(w % sq);
  const long long jh = w / sq;
  const long long at = (static_cast<long long>(i) * b + jh / heads) * heads * d + jh % heads * d;
  float s = 0.0f;
  for (int c = lane; c < d; c += 32) s += __bfloat162float(dout[at + c]) * out[at + c];
  s = warp_sum(s);
  if (lane == 0) delta[w] = s;
}

// ---------------------------------------------------------------------------------------------
// Host side.

constexpr int kWarps = 4;
// d <= 128: 64 x 64 tiles. d = 256 halves the tile that is not held per warp, to fit A100's
// 163 KiB of shared memory per block.
template <int DP>
constexpr int kFwdBn = DP <= 128 ? 64 : 32;
template <int DP>
constexpr int kBwdBm = DP <= 128 ? 64 : 32;

int padded_dim(std::int64_t d) { return d <= 32 ? 32 : d <= 64 ? 64 : d <= 96 ? 96 : d <= 128 ? 128 : 256; }

bool aligned16(const void* ptr) { return reinterpret_cast<std::uintptr_t>(ptr) % 16 == 0; }

[[noreturn]] void bad(const std::string& why) { throw std::invalid_argument("px::cuda::attention: " + why); }

void check_shape(const AttentionShape& sh) {
  if (sh.b <= 0 || sh.heads <= 0 || sh.groups <= 0 || sh.heads % sh.groups != 0)
    bad("needs b, heads, groups > 0 and groups dividing heads");
  if (sh.d < 1 || sh.d > 256) bad("head dim " + std::to_string(sh.d) + " outside 1 .. 256");
  if (sh.sq < 0 || sh.sk < 0 || sh.sq > INT_MAX / 2 || sh.sk > INT_MAX / 2) bad("block lengths out of range");
  if (sh.b * sh.heads > INT_MAX) bad("too many (sequence, head) pairs");
}

// The shape as the kernels take it (check_shape has bounded every field by INT_MAX).
template <class P>
void set_sizes(const AttentionShape& sh, P& p) {
  p.b = static_cast<int>(sh.b);
  p.heads = static_cast<int>(sh.heads);
  p.per_group = static_cast<int>(sh.heads / sh.groups);
  p.d = static_cast<int>(sh.d);
  p.sq = static_cast<int>(sh.sq);
  p.sk = static_cast<int>(sh.sk);
  p.off = sh.q_pos0 - sh.k_pos0;
}

void check_inputs(const AttentionShape& sh, const AttentionInputs& x) {
  if (!x.q || !x.k || !x.v) bad("null q, k or v");
  if (x.ldq < sh.heads * sh.d || x.ldk < sh.groups * sh.d || x.ldv < sh.groups * sh.d) bad("row stride below row");
}

template <class Kernel>
void allow_smem(Kernel kernel, std::size_t bytes) {
  int device = 0, major = 0, optin = 0;
  PX_CUDA_CHECK(cudaGetDevice(&device));
  PX_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 8) bad("bf16 tensor cores need compute capability 8.0 or newer");
  PX_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (bytes > static_cast<std::size_t>(optin))
    bad("tile needs " + std::to_string(bytes) + " bytes of shared memory, the device allows " +
        std::to_string(optin));
  PX_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

template <int DP, bool VEC>
void launch_forward(const FwdParams& p, cudaStream_t stream) {
  using T = FwdTile<DP, kWarps, kFwdBn<DP>>;
  const auto kernel = attention_forward_kernel<DP, kWarps, kFwdBn<DP>, VEC>;
  allow_smem(kernel, T::bytes);
  const long long blocks = static_cast<long long>((p.sq + T::BM - 1) / T::BM) * p.b * p.heads;
  if (blocks > INT_MAX) bad("grid too large");
  kernel<<<static_cast<unsigned>(blocks), T::NT, T::bytes, stream>>>(p);
  PX_CUDA_CHECK_LAUNCH();
}

template <int DP, bool VEC>
void launch_backward(const BwdParams& p, cudaStream_t stream) {
  using T = BwdTile<DP, kWarps, kBwdBm<DP>>;
  const auto kernel = attention_backward_kernel<DP, kWarps, kBwdBm<DP>, VEC>;
  allow_smem(kernel, T::bytes);
  const long long blocks = static_cast<long long>((p.sk + T::BN - 1) / T::BN) * p.b * p.heads;
  if (blocks > INT_MAX) bad("grid too large");
  kernel<<<static_cast<unsigned>(blocks), T::NT, T::bytes, stream>>>(p);
  PX_CUDA_CHECK_LAUNCH();
}

template <class P, template <int, bool> class Launch>
void dispatch(int dp, bool vec, const P& p, cudaStream_t stream) {
  switch (dp) {
    case 32: return vec ? Launch<32, true>::run(p, stream) : Launch<32, false>::run(p, stream);
    case 64: return vec ? Launch<64, true>::run(p, stream) : Launch<64, false>::run(p, stream);
    case 96: return vec ? Launch<96, true>::run(p, stream) : Launch<96, false>::run(p, stream);
    case 128: return vec ? Launch<128, true>::run(p, stream) : Launch<128, false>::run(p, stream);
    default: return vec ? Launch<256, true>::run(p, stream) : Launch<256, false>::run(p, stream);
  }
}

template <int DP, bool VEC>
struct Forward {
  static void run(const FwdParams& p, cudaStream_t s) { launch_forward<DP, VEC>(p, s); }
};
template <int DP, bool VEC>
struct Backward {
  static void run(const BwdParams& p, cudaStream_t s) { launch_backward<DP, VEC>(p, s); }
};

}  // namespace

void attention_forward(const AttentionShape& sh, const AttentionInputs& x, float* out, float* lse, bool first,
                       __nv_bfloat16* out_bf16, cudaStream_t stream) {
  check_shape(sh);
  if (sh.sq == 0) return;
  check_inputs(sh, x);
  if (!out || !lse) bad("null out or lse");
  const int dp = padded_dim(sh.d);
  // The 16-byte path needs whole padded rows (d == dp) at 16-byte aligned addresses; a head's
  // columns start at h * d, a multiple of 8 elements whenever d is.
  const bool vec = sh.d == dp && x.ldq % 8 == 0 && x.ldk % 8 == 0 && x.ldv % 8 == 0 && aligned16(x.q) &&
                   aligned16(x.k) && aligned16(x.v);
  FwdParams p{};
  p.q = x.q;
  p.k = x.k;
  p.v = x.v;
  p.ldq = x.ldq;
  p.ldk = x.ldk;
  p.ldv = x.ldv;
  p.out = out;
  p.lse = lse;
  p.out_bf16 = out_bf16;
  set_sizes(sh, p);
  p.scale_log2 = static_cast<float>(kLog2e / std::sqrt(static_cast<double>(sh.d)));
  p.first = first;
  dispatch<FwdParams, Forward>(dp, vec, p, stream);
}

void attention_backward_delta(const AttentionShape& sh, const float* out, const __nv_bfloat16* dout, float* delta,
                              cudaStream_t stream) {
  check_shape(sh);
  const long long rows = sh.b * sh.heads * sh.sq;
  if (rows == 0) return;
  if (!out || !dout || !delta) bad("null out, dout or delta");
  constexpr int kThreads = 256;
  const long long blocks = (rows + kThreads / 32 - 1) / (kThreads / 32);
  if (blocks > INT_MAX) bad("grid too large");
  attention_delta_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
      out, dout, delta, static_cast<int>(sh.b), static_cast<int>(sh.heads), static_cast<int>(sh.d),
      static_cast<int>(sh.sq));
  PX_CUDA_CHECK_LAUNCH();
}

void attention_backward(const AttentionShape& sh, const AttentionInputs& x, const float* lse, const float* delta,
                        const __nv_bfloat16* dout, const AttentionGrads& dx, cudaStream_t stream) {
  check_shape(sh);
  if (sh.sq == 0 || sh.sk == 0) return;
  check_inputs(sh, x);
  if (!lse || !delta || !dout) bad("null lse, delta or dout");
  if (!dx.dq || !dx.dk || !dx.dv) bad("null dq, dk or dv");
  if (dx.ldq < sh.heads * sh.d || dx.ldk < sh.groups * sh.d || dx.ldv < sh.groups * sh.d)
    bad("gradient row stride below row");
  const int dp = padded_dim(sh.d);
  const bool vec = sh.d == dp && x.ldq % 8 == 0 && x.ldk % 8 == 0 && x.ldv % 8 == 0 && aligned16(x.q) &&
                   aligned16(x.k) && aligned16(x.v) && aligned16(dout);
  BwdParams p{};
  p.q = x.q;
  p.k = x.k;
  p.v = x.v;
  p.ldq = x.ldq;
  p.ldk = x.ldk;
  p.ldv = x.ldv;
  p.lse = lse;
  p.delta = delta;
  p.dout = dout;
  p.dq = dx.dq;
  p.dk = dx.dk;
  p.dv = dx.dv;
  p.ldgq = dx.ldq;
  p.ldgk = dx.ldk;
  p.ldgv = dx.ldv;
  set_sizes(sh, p);
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(sh.d)));
  p.scale_log2 = static_cast<float>(kLog2e / std::sqrt(static_cast<double>(sh.d)));
  p.exclusive = sh.groups == sh.heads;
  dispatch<BwdParams, Backward>(dp, vec, p, stream);
}

}  // namespace px::cuda
