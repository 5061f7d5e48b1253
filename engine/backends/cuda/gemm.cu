// gemm.hpp on cuBLASLt: plans cached per shape, the row-major to column-major mapping, and the
// small kernels around the GEMMs (bias and GELU when the epilogue is not fused, bias-gradient
// column sums, beta scaling when k == 0).
#include "engine/backends/cuda/gemm.hpp"

#include <algorithm>
#include <array>
#include <climits>
#include <cstdint>
#include <map>
#include <stdexcept>
#include <string>

#include "engine/backends/cuda/check.hpp"
#include "engine/backends/cuda/device_buffer.hpp"

namespace px::cuda {
namespace {

// ---------------------------------------------------------------------------------------------
// Layout. cuBLASLt is column-major. A row-major [r x c] matrix with leading dimension ld is, byte
// for byte, the column-major [c x r] matrix with the same ld: its transpose. So the row-major
//   C[m x n] = op(A)[m x k] op(B)[k x n]
// is the column-major
//   C^T[n x m] = op(B)^T[n x k] op(A)^T[k x m],
// and since the column-major view of a stored row-major matrix already is its transpose, cuBLASLt
// gets our B as its A and our A as its B, each with its own trans flag unchanged, and M = n, N = m,
// K = k. A cuBLASLt layout describes the stored matrix before its op: its A is [M x K] (rows x cols)
// when op_a = N and [K x M] when op_a = T; its B [K x N] or [N x K]; D [M x N]. Checking the three
// linear-layer GEMMs against that (w row-major [k x n] is column-major [n x k] with ld n):
//   forward  y = x w:      A = w  (N, [n x k], ld n), B = x  (N, [k x m], ld k), D = y  [n x m], ld n
//   dgrad   dx = dy w^T:   A = w  (T, [n x k], ld n), B = dy (N, [n x m], ld n), D = dx [k x m], ld k
//   wgrad   dw += x^T dy:  A = dy (N, [n x m], ld n), B = x  (T, [k x m], ld k), D = dw [n x k], ld n
// cuBLASLt's bias has one element per row of D, i.e. per column of our row-major y: exactly bias[n]
// broadcast over the tokens. The aux (pre-activation) matrix has D's shape and its ld is D's rows.
// ---------------------------------------------------------------------------------------------

// One GEMM in cuBLASLt's terms: D[M x N] = alpha op(A)[M x K] op(B)[K x N] + beta D, `batch` times.
struct LtProblem {
  cublasOperation_t op_a = CUBLAS_OP_N, op_b = CUBLAS_OP_N;
  std::int64_t M = 0, N = 0, K = 0;
  const void* a = nullptr;
  std::int64_t lda = 0, stride_a = 0;
  const void* b = nullptr;
  std::int64_t ldb = 0, stride_b = 0;
  void* d = nullptr;
  std::int64_t ldd = 0, stride_d = 0;
  cudaDataType_t d_type = CUDA_R_16BF;
  std::int64_t batch = 1;
  float alpha = 1, beta = 0;
  cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_DEFAULT;
  const void* bias = nullptr;  // bf16, M per batch entry
  std::int64_t bias_stride = 0;
  void* aux = nullptr;  // bf16 [M x N], the pre-activation
  std::int64_t aux_ld = 0, aux_stride = 0;
};

LtProblem row_major(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha, const bf16* a,
                    std::int64_t lda, std::int64_t stride_a, const bf16* b, std::int64_t ldb, std::int64_t stride_b, float beta,
                    void* c, cudaDataType_t c_type, std::int64_t ldc, std::int64_t stride_c, std::int64_t batch) {
  LtProblem p;
  p.op_a = trans_b ? CUBLAS_OP_T : CUBLAS_OP_N;
  p.a = b;
  p.lda = ldb;
  p.stride_a = stride_b;
  p.op_b = trans_a ? CUBLAS_OP_T : CUBLAS_OP_N;
  p.b = a;
  p.ldb = lda;
  p.stride_b = stride_a;
  p.M = n;
  p.N = m;
  p.K = k;
  p.d = c;
  p.d_type = c_type;
  p.ldd = ldc;
  p.stride_d = stride_c;
  p.batch = batch;
  p.alpha = alpha;
  p.beta = beta;
  return p;
}

bool has_bias(cublasLtEpilogue_t e) { return (static_cast<unsigned>(e) & CUBLASLT_EPILOGUE_BIAS) != 0; }
bool has_aux(cublasLtEpilogue_t e) { return e == CUBLASLT_EPILOGUE_GELU_AUX || e == CUBLASLT_EPILOGUE_GELU_AUX_BIAS; }

std::size_t element_bytes(cudaDataType_t t) { return t == CUDA_R_32F ? 4 : 2; }

// Largest power of two (at most 256, cuBLASLt's default assumption) dividing the base address of
// every batch entry: the alignment the heuristic may assume for that operand, which it cannot see
// (it sees the leading dimensions and strides in the layouts, not the pointers).
std::uint32_t alignment(const void* p, std::int64_t stride_bytes) {
  const std::uint64_t bits =
      static_cast<std::uint64_t>(reinterpret_cast<std::uintptr_t>(p)) | 256u | static_cast<std::uint64_t>(stride_bytes);
  return static_cast<std::uint32_t>(bits & (~bits + 1));
}

std::string describe(const LtProblem& p) {
  return "cuBLASLt " + std::string(p.op_a == CUBLAS_OP_T ? "T" : "N") + (p.op_b == CUBLAS_OP_T ? "T" : "N") +
         " M=" + std::to_string(p.M) + " N=" + std::to_string(p.N) + " K=" + std::to_string(p.K) +
         " lda=" + std::to_string(p.lda) + " ldb=" + std::to_string(p.ldb) + " ldd=" + std::to_string(p.ldd) +
         " batch=" + std::to_string(p.batch) + " epilogue=" + std::to_string(static_cast<unsigned>(p.epilogue));
}

void validate(const LtProblem& p) {
  const auto fail = [&](const char* why) { throw std::invalid_argument(describe(p) + ": " + why); };
  if (p.M < 0 || p.N < 0 || p.K < 0 || p.batch < 0) fail("negative size");
  if (p.batch > INT32_MAX) fail("batch count over INT32_MAX");
  const std::int64_t a_rows = p.op_a == CUBLAS_OP_N ? p.M : p.K;
  const std::int64_t b_rows = p.op_b == CUBLAS_OP_N ? p.K : p.N;
  if (p.lda < std::max<std::int64_t>(1, a_rows) || p.ldb < std::max<std::int64_t>(1, b_rows) ||
      p.ldd < std::max<std::int64_t>(1, p.M))
    fail("leading dimension smaller than the rows of a stored matrix");
}

using PlanKey = std::array<std::int64_t, 22>;

PlanKey key_of(const LtProblem& p) {
  const std::int64_t e = static_cast<std::int64_t>(element_bytes(p.d_type));
  const bool batched = p.batch > 1;
  return {p.op_a,
          p.op_b,
          p.M,
          p.N,
          p.K,
          p.lda,
          p.ldb,
          p.ldd,
          p.d_type,
          p.batch,
          batched ? p.stride_a : 0,
          batched ? p.stride_b : 0,
          batched ? p.stride_d : 0,
          static_cast<std::int64_t>(p.epilogue),
          batched ? p.bias_stride : 0,
          p.aux_ld,
          batched ? p.aux_stride : 0,
          alignment(p.a, batched ? p.stride_a * 2 : 0),
          alignment(p.b, batched ? p.stride_b * 2 : 0),
          alignment(p.d, batched ? p.stride_d * e : 0),
          has_bias(p.epilogue) ? alignment(p.bias, batched ? p.bias_stride * 2 : 0) : 0,
          has_aux(p.epilogue) ? alignment(p.aux, batched ? p.aux_stride * 2 : 0) : 0};
}

// The descriptors and algorithm of one cached shape. Pointers are not part of it: bias and aux
// pointers are set on the descriptor before every launch.
struct Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t a = nullptr, b = nullptr, d = nullptr;
  cublasLtMatmulAlgo_t algo{};
  std::size_t workspace = 0;
  bool found = false;  // false: the heuristic offered nothing (a fused epilogue then falls back)

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;
  ~Plan() {
    if (d) (void)cublasLtMatrixLayoutDestroy(d);
    if (b) (void)cublasLtMatrixLayoutDestroy(b);
    if (a) (void)cublasLtMatrixLayoutDestroy(a);
    if (desc) (void)cublasLtMatmulDescDestroy(desc);
  }
};

template <class T>
void set_desc(cublasLtMatmulDesc_t desc, cublasLtMatmulDescAttributes_t attr, const T& value) {
  PX_CUDA_CHECK(cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)));
}
template <class T>
void set_layout(cublasLtMatrixLayout_t layout, cublasLtMatrixLayoutAttribute_t attr, const T& value) {
  PX_CUDA_CHECK(cublasLtMatrixLayoutSetAttribute(layout, attr, &value, sizeof(value)));
}
template <class T>
void set_pref(cublasLtMatmulPreference_t pref, cublasLtMatmulPreferenceAttributes_t attr, const T& value) {
  PX_CUDA_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, attr, &value, sizeof(value)));
}

cublasLtMatrixLayout_t make_layout(cudaDataType_t type, std::int64_t rows, std::int64_t cols, std::int64_t ld,
                                   std::int64_t batch, std::int64_t stride, cublasLtMatrixLayout_t* out) {
  PX_CUDA_CHECK(cublasLtMatrixLayoutCreate(out, type, static_cast<std::uint64_t>(rows), static_cast<std::uint64_t>(cols), ld));
  if (batch > 1) {
    set_layout(*out, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, static_cast<std::int32_t>(batch));
    set_layout(*out, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET, stride);
  }
  return *out;
}

constexpr int kHeuristicResults = 8;

// Whether an algorithm adds its split-k partial sums in fp32: no split, a separate reduction in the
// compute type, or (only for an fp32 output) in place in the output. A bf16 output reduced in
// place or in the output type would round every partial sum to bf16. An algorithm whose
// configuration cannot be read is taken as it is.
bool reduces_in_fp32(const cublasLtMatmulAlgo_t& algo, bool fp32_output) {
  std::int32_t splits = 1;
  std::uint32_t scheme = CUBLASLT_REDUCTION_SCHEME_NONE;
  std::size_t written = 0;
  if (cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_SPLITK_NUM, &splits, sizeof(splits), &written) !=
          CUBLAS_STATUS_SUCCESS ||
      cublasLtMatmulAlgoConfigGetAttribute(&algo, CUBLASLT_ALGO_CONFIG_REDUCTION_SCHEME, &scheme, sizeof(scheme), &written) !=
          CUBLAS_STATUS_SUCCESS)
    return true;
  if (splits <= 1 || scheme == CUBLASLT_REDUCTION_SCHEME_NONE || scheme == CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE) return true;
  return fp32_output && scheme == CUBLASLT_REDUCTION_SCHEME_INPLACE;
}

void set_epilogue_pointers(cublasLtMatmulDesc_t desc, const LtProblem& p) {
  if (has_bias(p.epilogue)) set_desc(desc, CUBLASLT_MATMUL_DESC_BIAS_POINTER, p.bias);
  if (has_aux(p.epilogue)) set_desc(desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, p.aux);
}

// ---------------------------------------------------------------------------------------------
// Kernels. Elementwise ones index D in cuBLASLt's column-major view: element (i, j), i < M rows,
// j < N columns, of batch entry blockIdx.z at d + z stride + j ld + i, so a warp reads contiguous i.
// ---------------------------------------------------------------------------------------------

constexpr int kThreads = 256;
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kCubic = 0.044715f;

__device__ float load(const bf16* p) { return __bfloat162float(*p); }
__device__ float load(const float* p) { return *p; }
__device__ void store(bf16* p, float v) { *p = __float2bfloat16(v); }
__device__ void store(float* p, float v) { *p = v; }

__device__ float gelu(float v) { return 0.5f * v * (1.0f + tanhf(kSqrt2OverPi * (v + kCubic * v * v * v))); }

template <class T>
__global__ void scale_kernel(T* d, std::int64_t M, std::int64_t N, std::int64_t ld, std::int64_t stride, float beta) {
  T* base = d + static_cast<std::int64_t>(blockIdx.z) * stride;
  for (std::int64_t j = blockIdx.y; j < N; j += gridDim.y)
    for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < M;
         i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
      T* v = base + j * ld + i;
      store(v, beta == 0.0f ? 0.0f : beta * load(v));  // beta == 0 overwrites NaNs, as cuBLAS does
    }
}

__global__ void broadcast_bias_kernel(bf16* d, const bf16* bias, std::int64_t M, std::int64_t N, std::int64_t ld,
                                      std::int64_t stride, std::int64_t bias_stride) {
  bf16* base = d + static_cast<std::int64_t>(blockIdx.z) * stride;
  const bf16* b = bias + static_cast<std::int64_t>(blockIdx.z) * bias_stride;
  for (std::int64_t j = blockIdx.y; j < N; j += gridDim.y)
    for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < M;
         i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)
      base[j * ld + i] = b[i];
}

// d := gelu(d), saving d first into pre when pre is not null.
__global__ void gelu_kernel(bf16* d, bf16* pre, std::int64_t M, std::int64_t N, std::int64_t ld, std::int64_t stride,
                            std::int64_t pre_ld, std::int64_t pre_stride) {
  bf16* base = d + static_cast<std::int64_t>(blockIdx.z) * stride;
  bf16* saved = pre ? pre + static_cast<std::int64_t>(blockIdx.z) * pre_stride : nullptr;
  for (std::int64_t j = blockIdx.y; j < N; j += gridDim.y)
    for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < M;
         i += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
      bf16* v = base + j * ld + i;
      if (saved) saved[j * pre_ld + i] = *v;
      store(v, gelu(load(v)));
    }
}

// Column sums of row-major dy[m x n] (per batch entry, entries m n apart), in row-major terms. A
// block of kSumCols x kSumRows threads sums rows [y R, (y + 1) R) of kSumCols columns: thread
// (c, r) adds rows r, r + kSumRows, ... of column c, then row 0 of the block adds the kSumRows
// partials in order. With one chunk (gridDim.y == 1) it adds into dbias directly; otherwise it writes
// partial[z][y][n] and column_sums_finish adds the chunks in order. A fixed order throughout, so the
// sums are reproducible, unlike atomics.
constexpr int kSumCols = 32;
constexpr int kSumRows = 8;

__global__ void column_sums_kernel(const bf16* dy, std::int64_t m, std::int64_t n, std::int64_t rows_per_chunk, float* dbias,
                                   float* partial) {
  __shared__ float sums[kSumRows][kSumCols + 1];
  const std::int64_t col = static_cast<std::int64_t>(blockIdx.x) * kSumCols + threadIdx.x;
  const std::int64_t z = blockIdx.z;
  const bf16* src = dy + z * m * n;
  const std::int64_t r0 = static_cast<std::int64_t>(blockIdx.y) * rows_per_chunk;
  const std::int64_t r1 = std::min(m, r0 + rows_per_chunk);
  float s = 0.0f;
  if (col < n)
    for (std::int64_t r = r0 + threadIdx.y; r < r1; r += kSumRows) s += load(src + r * n + col);
  sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y != 0 || col >= n) return;
  float t = 0.0f;
  for (int r = 0; r < kSumRows; ++r) t += sums[r][threadIdx.x];
  if (partial)
    partial[(z * gridDim.y + blockIdx.y) * n + col] = t;
  else
    dbias[z * n + col] += t;
}

__global__ void column_sums_finish(const float* partial, std::int64_t chunks, std::int64_t n, float* dbias) {
  const std::int64_t col = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const std::int64_t z = blockIdx.y;
  if (col >= n) return;
  float s = 0.0f;
  for (std::int64_t c = 0; c < chunks; ++c) s += partial[(z * chunks + c) * n + col];
  dbias[z * n + col] += s;
}

unsigned blocks(std::int64_t count, std::int64_t per_block, std::int64_t cap) {
  return static_cast<unsigned>(std::clamp<std::int64_t>((count + per_block - 1) / per_block, 1, cap));
}

// Grid for the column-major elementwise kernels over D[M x N] x batch.
dim3 elementwise_grid(std::int64_t M, std::int64_t N, std::int64_t batch) {
  return dim3(blocks(M, kThreads, 1024), static_cast<unsigned>(std::clamp<std::int64_t>(N, 1, 65535)),
              static_cast<unsigned>(batch));
}

void check_grid_batch(std::int64_t batch) {
  if (batch > 65535) throw std::invalid_argument("px::cuda GEMM: batch over 65535 (one grid z per batch entry)");
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The context
// ---------------------------------------------------------------------------------------------

struct GemmContext::Impl {
  cudaStream_t stream;
  GemmOptions options;
  DeviceBuffer<std::byte> workspace;
  int sm_count = 0;
  cublasLtHandle_t handle = nullptr;
  std::map<PlanKey, std::unique_ptr<Plan>> plans;
  GemmStats stats;

  Impl(cudaStream_t s, GemmOptions o) : stream(s), options(o), workspace(o.workspace_bytes) {
    int device = 0;
    PX_CUDA_CHECK(cudaGetDevice(&device));
    PX_CUDA_CHECK(cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device));
    PX_CUDA_CHECK(cublasLtCreate(&handle));
  }
  Impl(const Impl&) = delete;
  Impl& operator=(const Impl&) = delete;
  ~Impl() {
    plans.clear();  // descriptors before the handle
    if (handle) (void)cublasLtDestroy(handle);
  }

  // The plan of p's shape, running the heuristic the first time the shape is seen.
  Plan& plan(const LtProblem& p) {
    const PlanKey key = key_of(p);
    if (auto it = plans.find(key); it != plans.end()) return *it->second;
    // Shapes of a training program are a few dozen; the bound only stops a pathological caller
    // (say, ever-changing pointer alignments) from growing the map without end.
    if (plans.size() >= 1024) plans.clear();

    auto fresh = std::make_unique<Plan>();
    Plan* plan = fresh.get();
    PX_CUDA_CHECK(cublasLtMatmulDescCreate(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    set_desc(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, static_cast<std::int32_t>(p.op_a));
    set_desc(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, static_cast<std::int32_t>(p.op_b));
    if (p.epilogue != CUBLASLT_EPILOGUE_DEFAULT) {
      // Bias and aux types are left at their default, D's type (bf16): the documented combination.
      set_desc(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE, static_cast<std::uint32_t>(p.epilogue));
      if (has_bias(p.epilogue) && p.batch > 1) set_desc(plan->desc, CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, p.bias_stride);
      if (has_aux(p.epilogue)) {
        set_desc(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, p.aux_ld);
        if (p.batch > 1) set_desc(plan->desc, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE, p.aux_stride);
      }
      set_epilogue_pointers(plan->desc, p);  // the heuristic reads their alignment
    }
    const bool a_n = p.op_a == CUBLAS_OP_N, b_n = p.op_b == CUBLAS_OP_N;
    make_layout(CUDA_R_16BF, a_n ? p.M : p.K, a_n ? p.K : p.M, p.lda, p.batch, p.stride_a, &plan->a);
    make_layout(CUDA_R_16BF, b_n ? p.K : p.N, b_n ? p.N : p.K, p.ldb, p.batch, p.stride_b, &plan->b);
    make_layout(p.d_type, p.M, p.N, p.ldd, p.batch, p.stride_d, &plan->d);

    cublasLtMatmulPreference_t pref = nullptr;
    PX_CUDA_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    struct PrefGuard {
      cublasLtMatmulPreference_t p;
      ~PrefGuard() { (void)cublasLtMatmulPreferenceDestroy(p); }
    } guard{pref};
    set_pref(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, static_cast<std::uint64_t>(workspace.bytes()));
    const std::int64_t e = static_cast<std::int64_t>(element_bytes(p.d_type));
    const bool batched = p.batch > 1;
    set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment(p.a, batched ? p.stride_a * 2 : 0));
    set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment(p.b, batched ? p.stride_b * 2 : 0));
    const std::uint32_t d_align = alignment(p.d, batched ? p.stride_d * e : 0);
    set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, d_align);
    set_pref(pref, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, d_align);

    cublasLtMatmulHeuristicResult_t results[kHeuristicResults] = {};
    int returned = 0;
    ++stats.heuristic_calls;
    // C and D are one matrix (C = D in place), so they share a layout.
    const cublasStatus_t status = cublasLtMatmulAlgoGetHeuristic(handle, plan->desc, plan->a, plan->b, plan->d, plan->d, pref,
                                                                 kHeuristicResults, results, &returned);
    if (status != CUBLAS_STATUS_NOT_SUPPORTED) check(status, "cublasLtMatmulAlgoGetHeuristic", __FILE__, __LINE__);
    // The fastest candidate (results come fastest first) that reduces split-k partials in fp32; the
    // fastest of all only when none does.
    const cublasLtMatmulHeuristicResult_t* chosen = nullptr;
    const cublasLtMatmulHeuristicResult_t* fastest = nullptr;
    for (int i = 0; status == CUBLAS_STATUS_SUCCESS && i < returned && !chosen; ++i) {
      const cublasLtMatmulHeuristicResult_t& r = results[i];
      if (r.state != CUBLAS_STATUS_SUCCESS || r.workspaceSize > workspace.bytes()) continue;
      if (!fastest) fastest = &r;
      if (reduces_in_fp32(r.algo, p.d_type == CUDA_R_32F)) chosen = &r;
    }
    if (!chosen && fastest) {
      chosen = fastest;
      ++stats.low_precision_reductions;
    }
    if (chosen) {
      plan->algo = chosen->algo;
      plan->workspace = chosen->workspaceSize;
      plan->found = true;
    }
    return *plans.emplace(key, std::move(fresh)).first->second;
  }

  // D = alpha op(A) op(B) + beta D with p's epilogue; false when cuBLASLt has no algorithm for it.
  bool try_matmul(const LtProblem& p) {
    Plan& pl = plan(p);
    if (!pl.found) return false;
    set_epilogue_pointers(pl.desc, p);
    PX_CUDA_CHECK(cublasLtMatmul(handle, pl.desc, &p.alpha, p.a, pl.a, p.b, pl.b, &p.beta, p.d, pl.d, p.d, pl.d, &pl.algo,
                                 workspace.data(), workspace.bytes(), stream));
    return true;
  }

  // The whole problem, including the degenerate sizes cuBLASLt need not handle.
  void run(const LtProblem& p) {
    validate(p);
    if (p.M == 0 || p.N == 0 || p.batch == 0) return;
    if (p.K == 0) {  // D = beta D, exactly (beta == 1 leaves it untouched)
      if (p.beta == 1.0f) return;
      check_grid_batch(p.batch);
      const dim3 grid = elementwise_grid(p.M, p.N, p.batch);
      if (p.d_type == CUDA_R_32F)
        scale_kernel<<<grid, kThreads, 0, stream>>>(static_cast<float*>(p.d), p.M, p.N, p.ldd, p.stride_d, p.beta);
      else
        scale_kernel<<<grid, kThreads, 0, stream>>>(static_cast<bf16*>(p.d), p.M, p.N, p.ldd, p.stride_d, p.beta);
      PX_CUDA_CHECK_LAUNCH();
      return;
    }
    if (!try_matmul(p)) throw CudaError(describe(p) + ": cublasLtMatmulAlgoGetHeuristic found no algorithm");
  }

  // dbias[z][n] += column sums of row-major dy[z][m x n].
  void column_sums(const bf16* dy, float* dbias, std::int64_t m, std::int64_t n, std::int64_t batch) {
    if (m == 0 || n == 0 || batch == 0) return;
    check_grid_batch(batch);
    const std::int64_t col_blocks = (n + kSumCols - 1) / kSumCols;
    // Enough row chunks for a few blocks per SM, each at least 8 rows per thread; the partials live in
    // the GEMM workspace, free once the stream's previous GEMM has finished.
    const std::int64_t want = (4 * std::max(sm_count, 1) + col_blocks * batch - 1) / (col_blocks * batch);
    const std::int64_t fit = static_cast<std::int64_t>(workspace.bytes() / sizeof(float)) / (n * batch);
    const std::int64_t chunks = std::clamp<std::int64_t>(std::min({want, (m + 63) / 64, fit, std::int64_t{65535}}), 1, 65535);
    const std::int64_t rows_per_chunk = (m + chunks - 1) / chunks;
    const dim3 grid(static_cast<unsigned>(col_blocks), static_cast<unsigned>(chunks), static_cast<unsigned>(batch));
    const dim3 block(kSumCols, kSumRows);
    float* partial = chunks > 1 ? reinterpret_cast<float*>(workspace.data()) : nullptr;
    column_sums_kernel<<<grid, block, 0, stream>>>(dy, m, n, rows_per_chunk, dbias, partial);
    PX_CUDA_CHECK_LAUNCH();
    if (!partial) return;
    column_sums_finish<<<dim3(blocks(n, kThreads, INT32_MAX), static_cast<unsigned>(batch)), kThreads, 0, stream>>>(partial, chunks,
                                                                                                                  n, dbias);
    PX_CUDA_CHECK_LAUNCH();
  }

  void linear_forward(const bf16* x, const bf16* w, const bf16* bias, bf16* y, std::int64_t m, std::int64_t n, std::int64_t k,
                      std::int64_t batch, Activation act, bf16* pre) {
    if (m < 0 || n < 0 || k < 0 || batch < 0) throw std::invalid_argument("px::cuda::linear_forward: negative size");
    if (m == 0 || n == 0 || batch == 0) return;
    if (k == 0) throw std::invalid_argument("px::cuda::linear_forward: k == 0 (a linear layer without inputs)");
    const LtProblem plain = row_major(false, false, m, n, k, 1.0f, x, k, m * k, w, n, k * n, 0.0f, y, CUDA_R_16BF, n, m * n, batch);
    const bool gelu_act = act == Activation::Gelu;
    const bool save = gelu_act && pre != nullptr;
    if (!bias && !gelu_act) return run(plain);

    // cuBLASLt's aux ld and batch stride must be multiples of 8 elements.
    if (options.fuse_epilogues && (!save || n % 8 == 0)) {
      LtProblem fused = plain;
      if (gelu_act)
        fused.epilogue = save ? (bias ? CUBLASLT_EPILOGUE_GELU_AUX_BIAS : CUBLASLT_EPILOGUE_GELU_AUX)
                              : (bias ? CUBLASLT_EPILOGUE_GELU_BIAS : CUBLASLT_EPILOGUE_GELU);
      else
        fused.epilogue = CUBLASLT_EPILOGUE_BIAS;
      fused.bias = bias;
      fused.bias_stride = n;
      if (save) {
        fused.aux = pre;
        fused.aux_ld = n;
        fused.aux_stride = m * n;
      }
      validate(fused);
      if (try_matmul(fused)) {
        ++stats.fused_epilogues;
        return;
      }
    }

    // Unfused: y = bias broadcast, then y += x w (one rounding of the sum, as the fused path), then GELU.
    ++stats.unfused_epilogues;
    check_grid_batch(batch);
    const dim3 grid = elementwise_grid(n, m, batch);  // D is [n x m] column-major
    LtProblem product = plain;
    if (bias) {
      broadcast_bias_kernel<<<grid, kThreads, 0, stream>>>(y, bias, n, m, n, m * n, n);
      PX_CUDA_CHECK_LAUNCH();
      product.beta = 1.0f;
    }
    run(product);
    if (gelu_act) {
      gelu_kernel<<<grid, kThreads, 0, stream>>>(y, pre, n, m, n, m * n, n, m * n);
      PX_CUDA_CHECK_LAUNCH();
    }
  }
};

GemmContext::GemmContext(cudaStream_t stream, GemmOptions options) : impl_(std::make_unique<Impl>(stream, options)) {}
GemmContext::~GemmContext() = default;
cudaStream_t GemmContext::stream() const { return impl_->stream; }
void GemmContext::set_stream(cudaStream_t stream) { impl_->stream = stream; }
cublasLtHandle_t GemmContext::handle() const { return impl_->handle; }
GemmStats GemmContext::stats() const {
  GemmStats s = impl_->stats;
  s.plans = impl_->plans.size();
  return s;
}

// ---------------------------------------------------------------------------------------------
// Entry points
// ---------------------------------------------------------------------------------------------

void gemm(GemmContext& ctx, bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
          const bf16* a, std::int64_t lda, const bf16* b, std::int64_t ldb, float beta, bf16* c, std::int64_t ldc) {
  ctx.impl().run(row_major(trans_a, trans_b, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, CUDA_R_16BF, ldc, 0, 1));
}
void gemm(GemmContext& ctx, bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, float alpha,
          const bf16* a, std::int64_t lda, const bf16* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  ctx.impl().run(row_major(trans_a, trans_b, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, CUDA_R_32F, ldc, 0, 1));
}

void gemm_strided_batched(GemmContext& ctx, bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                          float alpha, const bf16* a, std::int64_t lda, std::int64_t stride_a, const bf16* b,
                          std::int64_t ldb, std::int64_t stride_b, float beta, bf16* c, std::int64_t ldc,
                          std::int64_t stride_c, std::int64_t batch) {
  ctx.impl().run(
      row_major(trans_a, trans_b, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, CUDA_R_16BF, ldc, stride_c, batch));
}
void gemm_strided_batched(GemmContext& ctx, bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k,
                          float alpha, const bf16* a, std::int64_t lda, std::int64_t stride_a, const bf16* b,
                          std::int64_t ldb, std::int64_t stride_b, float beta, float* c, std::int64_t ldc,
                          std::int64_t stride_c, std::int64_t batch) {
  ctx.impl().run(
      row_major(trans_a, trans_b, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b, beta, c, CUDA_R_32F, ldc, stride_c, batch));
}

void linear_forward(GemmContext& ctx, const bf16* x, const bf16* w, const bf16* bias, bf16* y, std::int64_t m,
                    std::int64_t n, std::int64_t k, Activation act, bf16* pre_activation) {
  ctx.impl().linear_forward(x, w, bias, y, m, n, k, 1, act, pre_activation);
}
void linear_forward_batched(GemmContext& ctx, const bf16* x, const bf16* w, const bf16* bias, bf16* y, std::int64_t m,
                            std::int64_t n, std::int64_t k, std::int64_t batch, Activation act, bf16* pre_activation) {
  ctx.impl().linear_forward(x, w, bias, y, m, n, k, batch, act, pre_activation);
}

void linear_backward_input(GemmContext& ctx, const bf16* dy, const bf16* w, bf16* dx, std::int64_t m, std::int64_t n,
                           std::int64_t k, bool accumulate) {
  linear_backward_input_batched(ctx, dy, w, dx, m, n, k, 1, accumulate);
}
void linear_backward_input_batched(GemmContext& ctx, const bf16* dy, const bf16* w, bf16* dx, std::int64_t m,
                                   std::int64_t n, std::int64_t k, std::int64_t batch, bool accumulate) {
  // dx[m x k] = dy[m x n] (w[k x n])^T
  ctx.impl().run(row_major(false, true, m, k, n, 1.0f, dy, n, m * n, w, n, k * n, accumulate ? 1.0f : 0.0f, dx, CUDA_R_16BF, k,
                           m * k, batch));
}

void linear_backward_weight(GemmContext& ctx, const bf16* x, const bf16* dy, float* dw, float* dbias, std::int64_t m,
                            std::int64_t n, std::int64_t k) {
  linear_backward_weight_batched(ctx, x, dy, dw, dbias, m, n, k, 1);
}
void linear_backward_weight_batched(GemmContext& ctx, const bf16* x, const bf16* dy, float* dw, float* dbias,
                                    std::int64_t m, std::int64_t n, std::int64_t k, std::int64_t batch) {
  // dw[k x n] += (x[m x k])^T dy[m x n]: beta = 1 on the fp32 gradient
  ctx.impl().run(row_major(true, false, k, n, m, 1.0f, x, k, m * k, dy, n, m * n, 1.0f, dw, CUDA_R_32F, n, k * n, batch));
  if (dbias) ctx.impl().column_sums(dy, dbias, m, n, batch);
}

}  // namespace px::cuda
