// Fused CPU kernels for memeff's AdamSN and Adafactor steps (float32 and float64).
//
// Built at first use by memeff/optim/kernels.py with torch.utils.cpp_extension.load.
// Each kernel does the arithmetic of the eager code (memeff/optim/adamsn.py,
// memeff/optim/adafactor.py) op for op and in the same order, but in one or two sweeps
// over memory instead of one per op: a row of the parameter is read from DRAM once and
// every op on it runs while it sits in L1. Rows are shared out with at::parallel_for,
// which runs on torch's own intra-op thread pool.
//
// Conventions: every tensor is contiguous and of one dtype T (checked on entry); the
// parameter is viewed as row-major (n, m) matrices; the Python scalars arrive as double
// and are rounded to T once, as torch does with a scalar argument of a T tensor op.

#include <torch/extension.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// Elements per parallel task at least, so that a task's work outweighs its dispatch.
constexpr int64_t kMinTaskElements = 1 << 15;

// Independent partial sums in a row reduction: the compiler may vectorize across them
// without reassociating floating-point adds (which it may not do for a single sum).
constexpr int kLanes = 16;

// torch's lerp (ATen/native/Lerp.h): the form depends on whether the weight is small.
template <typename T>
inline T lerp(T start, T end, T weight) {
  return std::abs(weight) < T(0.5) ? start + weight * (end - start)
                                   : end - (end - start) * (T(1) - weight);
}

template <typename T>
T sum_of_squares(const T* x, int64_t length) {
  T lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= length; j += kLanes) {
    for (int k = 0; k < kLanes; ++k) lanes[k] += x[j + k] * x[j + k];
  }
  T total = 0;
  for (; j < length; ++j) total += x[j] * x[j];
  for (int k = 0; k < kLanes; ++k) total += lanes[k];
  return total;
}

// A long sum in pieces, each summed in T and added up in double, so that its rounding
// error does not grow with the length as one running sum in float32 would.
constexpr int64_t kPiece = 1024;

template <typename T>
double long_sum_of_squares(const T* x, int64_t length) {
  double total = 0.0;
  for (int64_t start = 0; start < length; start += kPiece) {
    total += double(sum_of_squares(x + start, std::min(kPiece, length - start)));
  }
  return total;
}

// Asks for a row of `length` elements to be brought into cache while other work runs: a
// core keeps few misses in flight on one stream, so fetching the rows of a later sweep
// during an earlier one raises the bandwidth a core gets.
template <typename T>
inline void prefetch_row(const T* x, int64_t length) {
  constexpr int64_t kLine = 64 / sizeof(T);
  for (int64_t j = 0; j < length; j += kLine) __builtin_prefetch(x + j);
}

// Rows per task when rows are independent.
int64_t rows_per_task(int64_t row_length) {
  return std::max<int64_t>(1, kMinTaskElements / std::max<int64_t>(1, row_length));
}

// Contiguous blocks of rows, one per task, for reductions over rows (each block
// accumulates into its own partial vector; the blocks are summed in order afterwards,
// so the result does not depend on which thread ran which block).
int64_t row_blocks(int64_t rows, int64_t row_length) {
  const int64_t by_work = std::max<int64_t>(1, rows * row_length / kMinTaskElements);
  return std::max<int64_t>(1, std::min({rows, by_work, int64_t(at::get_num_threads())}));
}

inline int64_t block_start(int64_t block, int64_t blocks, int64_t rows) {
  return rows * block / blocks;
}

void check_tensor(const at::Tensor& t, const at::Tensor& like, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.scalar_type() == like.scalar_type(), name, " must have the param's dtype ",
              like.scalar_type(), ", got ", t.scalar_type());
}

// ---- AdamSN ----------------------------------------------------------------------------

// Passed by value, so that the compiler knows that stores to the tensors leave them
// unchanged (through a reference it must assume they may alias, and not vectorize).
template <typename T>
struct AdamSNScalars {
  T momentum_weight, beta2, one_minus_beta2, neg_step_size, bias_correction2_sqrt, eps, decay;
};

// The eager per-subset ops, on one row of m elements whose denominator is known:
//   w.mul_(decay); m.lerp_(g, momentum_weight); w.addcdiv_(m, denom, value=-step_size)
template <typename T>
inline void adamsn_row_update(T* w, const T* g, T* m, const T* denom, bool denom_per_element,
                              int64_t length, const AdamSNScalars<T> s) {
  if (denom_per_element) {
    for (int64_t j = 0; j < length; ++j) {
      const T mj = lerp(m[j], g[j], s.momentum_weight);
      m[j] = mj;
      w[j] = w[j] * s.decay + s.neg_step_size * mj / denom[j];
    }
  } else {
    const T d = denom[0];
    for (int64_t j = 0; j < length; ++j) {
      const T mj = lerp(m[j], g[j], s.momentum_weight);
      m[j] = mj;
      w[j] = w[j] * s.decay + s.neg_step_size * mj / d;
    }
  }
}

template <typename T>
inline T adamsn_denominator(T* v, T subset_sum, const AdamSNScalars<T> s) {
  // v.mul_(beta2).add_(sums, alpha=1 - beta2); v.sqrt().div_(bc2_sqrt).add_(eps)
  const T updated = v[0] * s.beta2 + s.one_minus_beta2 * subset_sum;
  v[0] = updated;
  return std::sqrt(updated) / s.bias_correction2_sqrt + s.eps;
}

// Subsets are rows (v has shape (n, 1)): per row, sum G^2, update v, then one sweep.
template <typename T>
void adamsn_rows(T* w, const T* g, T* m, T* v, int64_t n, int64_t cols,
                 const AdamSNScalars<T> s) {
  at::parallel_for(0, n, rows_per_task(cols), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t offset = i * cols;
      prefetch_row(w + offset, cols);  // read while G's row is summed
      prefetch_row(m + offset, cols);
      const T denom = adamsn_denominator(v + i, sum_of_squares(g + offset, cols), s);
      adamsn_row_update(w + offset, g + offset, m + offset, &denom, false, cols, s);
    }
  });
}

// Subsets are columns (v has shape (1, m)): pass 1 sums G^2 down the columns into one
// partial vector per block of rows; pass 2 updates m and w row by row.
template <typename T>
void adamsn_columns(T* w, const T* g, T* m, T* v, int64_t n, int64_t cols,
                    const AdamSNScalars<T> s) {
  const int64_t blocks = row_blocks(n, cols);
  std::vector<T> partial(blocks * cols, T(0));
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* sums = partial.data() + b * cols;
      for (int64_t i = block_start(b, blocks, n); i < block_start(b + 1, blocks, n); ++i) {
        const T* gi = g + i * cols;
        for (int64_t j = 0; j < cols; ++j) sums[j] += gi[j] * gi[j];
      }
    }
  });
  std::vector<T> denom(cols);
  for (int64_t j = 0; j < cols; ++j) {
    T column_sum = partial[j];
    for (int64_t b = 1; b < blocks; ++b) column_sum += partial[b * cols + j];
    denom[j] = adamsn_denominator(v + j, column_sum, s);
  }
  at::parallel_for(0, n, rows_per_task(cols), [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t offset = i * cols;
      adamsn_row_update(w + offset, g + offset, m + offset, denom.data(), true, cols, s);
    }
  });
}

// One subset per element (AdamW's second moment): the eager _per_element_update, fused.
template <typename T>
void adamsn_elements(T* w, const T* g, T* m, T* v, int64_t numel, const AdamSNScalars<T> s) {
  at::parallel_for(0, numel, kMinTaskElements, [&](int64_t begin, int64_t end) {
    for (int64_t j = begin; j < end; ++j) {
      const T mj = lerp(m[j], g[j], s.momentum_weight);
      m[j] = mj;
      // v.mul_(beta2).addcmul_(g, g, value=1 - beta2); sqrt(v).div_(bc2_sqrt).add_(eps)
      const T vj = v[j] * s.beta2 + s.one_minus_beta2 * g[j] * g[j];
      v[j] = vj;
      const T denom = std::sqrt(vj) / s.bias_correction2_sqrt + s.eps;
      w[j] = w[j] * s.decay + s.neg_step_size * mj / denom;
    }
  });
}

// One AdamSN step with a full-size first moment, whose subsets are the param's elements
// (exp_avg_sq has the param's size), its rows or its columns (subset_size "auto"). The
// (n, m) view comes from exp_avg_sq's size.
void adamsn_step(at::Tensor param, at::Tensor grad, at::Tensor exp_avg, at::Tensor exp_avg_sq,
                 bool along_columns, double momentum_weight, double beta2, double step_size,
                 double bias_correction2_sqrt, double eps, double decay) {
  check_tensor(param, param, "param");
  check_tensor(grad, param, "grad");
  check_tensor(exp_avg, param, "exp_avg");
  check_tensor(exp_avg_sq, param, "exp_avg_sq");
  const int64_t numel = param.numel();
  TORCH_CHECK(grad.numel() == numel && exp_avg.numel() == numel, "grad and exp_avg must match param");
  const int64_t subsets = exp_avg_sq.numel();
  TORCH_CHECK(subsets > 0 && numel % subsets == 0, "exp_avg_sq's size must divide param's");
  const bool per_element = subsets == numel;
  const int64_t n = along_columns ? numel / subsets : subsets;
  const int64_t cols = along_columns ? subsets : numel / subsets;
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "memeff_adamsn_step", [&] {
    const AdamSNScalars<scalar_t> s{
        scalar_t(momentum_weight), scalar_t(beta2), scalar_t(1 - beta2), scalar_t(-step_size),
        scalar_t(bias_correction2_sqrt), scalar_t(eps), scalar_t(decay)};
    auto* w = param.data_ptr<scalar_t>();
    const auto* g = grad.data_ptr<scalar_t>();
    auto* m = exp_avg.data_ptr<scalar_t>();
    auto* v = exp_avg_sq.data_ptr<scalar_t>();
    if (per_element) {
      adamsn_elements(w, g, m, v, numel, s);
    } else if (along_columns) {
      adamsn_columns(w, g, m, v, n, cols, s);
    } else {
      adamsn_rows(w, g, m, v, n, cols, s);
    }
  });
}

// ---- Adafactor, factored second moment ---------------------------------------------------

// Pass 1 over one (n, m) matrix: R <- lerp(R, mean_j(G^2) + eps1, w2) row by row; column
// sums of G^2 and of G^2 / R_i (R_i final once its row is seen); optionally sum of W^2.
// Then C <- lerp(C, mean_i(G^2) + eps1, w2). Returns {sum_ij G^2 / V_ij, sum W^2} and
// writes mean(R) to *row_mean.
template <typename T>
std::pair<double, double> adafactor_matrix_statistics(const T* g, const T* w, T* row_var,
                                                      T* col_var, T* row_mean, int64_t n,
                                                      int64_t cols, T beta2_weight, T eps1,
                                                      bool param_norm) {
  const int64_t blocks = row_blocks(n, cols);
  // per block: column sums of G^2, then column sums of G^2 / R_i
  std::vector<T> partial(blocks * 2 * cols, T(0));
  std::vector<double> partial_param_squares(blocks, 0.0);
  const T row_length = T(cols);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      T* sums = partial.data() + b * 2 * cols;
      T* weighted_sums = sums + cols;
      double param_squares = 0.0;
      for (int64_t i = block_start(b, blocks, n); i < block_start(b + 1, blocks, n); ++i) {
        const T* gi = g + i * cols;
        if (param_norm) prefetch_row(w + i * cols, cols);  // summed after this sweep
        T lanes[kLanes] = {};
        int64_t j = 0;
        for (; j + kLanes <= cols; j += kLanes) {
          for (int k = 0; k < kLanes; ++k) {
            const T square = gi[j + k] * gi[j + k];
            lanes[k] += square;
            sums[j + k] += square;
          }
        }
        T row_sum = 0;
        for (; j < cols; ++j) {
          const T square = gi[j] * gi[j];
          row_sum += square;
          sums[j] += square;
        }
        for (int k = 0; k < kLanes; ++k) row_sum += lanes[k];
        // squares.sum(dim=1).div_(m).add_(eps1), then row_var.lerp_(.., beta2_weight)
        const T r = lerp(row_var[i], row_sum / row_length + eps1, beta2_weight);
        row_var[i] = r;
        const T inv_r = T(1) / r;
        for (j = 0; j < cols; ++j) weighted_sums[j] += inv_r * (gi[j] * gi[j]);
        if (param_norm) param_squares += double(sum_of_squares(w + i * cols, cols));
      }
      partial_param_squares[b] = param_squares;
    }
  });
  double row_total = 0.0;
  for (int64_t i = 0; i < n; ++i) row_total += double(row_var[i]);
  const T mean_r = T(row_total / double(n));
  *row_mean = mean_r;
  double weighted_total = 0.0;
  for (int64_t j = 0; j < cols; ++j) {
    T column_sum = partial[j];
    T weighted_column_sum = partial[cols + j];
    for (int64_t b = 1; b < blocks; ++b) {
      column_sum += partial[b * 2 * cols + j];
      weighted_column_sum += partial[b * 2 * cols + cols + j];
    }
    const T c = lerp(col_var[j], column_sum / T(n) + eps1, beta2_weight);
    col_var[j] = c;
    weighted_total += double(weighted_column_sum / c);
  }
  double param_squares = 0.0;
  for (int64_t b = 0; b < blocks; ++b) param_squares += partial_param_squares[b];
  // sum_ij G^2 / V_ij = mean(R) * sum_j (sum_i G_ij^2 / R_i) / C_j
  return {double(mean_r) * weighted_total, param_squares};
}

// Pass 1 of a factored Adafactor step over every (n, m) matrix of the param. Writes each
// matrix's mean(R) into row_means (one value per matrix) and returns
// [sum of G^2 / V over the whole tensor, sum of W^2 (0 unless param_norm, which the
// caller sets when the step scales by RMS(W): W is then read in this pass, every step)].
std::vector<double> adafactor_factored_statistics(at::Tensor grad, at::Tensor param,
                                                  at::Tensor row_var, at::Tensor col_var,
                                                  at::Tensor row_means, double beta2_weight,
                                                  double eps1, bool param_norm) {
  check_tensor(param, param, "param");
  check_tensor(grad, param, "grad");
  check_tensor(row_var, param, "row_var");
  check_tensor(col_var, param, "col_var");
  check_tensor(row_means, param, "row_means");
  TORCH_CHECK(param.dim() >= 2, "a factored param has 2 or more dims");
  const int64_t n = param.size(-2), cols = param.size(-1);
  const int64_t matrices = n * cols == 0 ? 0 : param.numel() / (n * cols);
  TORCH_CHECK(row_var.numel() == matrices * n && col_var.numel() == matrices * cols &&
                  row_means.numel() == matrices && grad.numel() == param.numel(),
              "state sizes do not match the param");
  double sum_u_squared = 0.0, sum_param_squared = 0.0;
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "memeff_adafactor_statistics", [&] {
    for (int64_t b = 0; b < matrices; ++b) {
      const auto [u_squared, param_squared] = adafactor_matrix_statistics<scalar_t>(
          grad.data_ptr<scalar_t>() + b * n * cols, param.data_ptr<scalar_t>() + b * n * cols,
          row_var.data_ptr<scalar_t>() + b * n, col_var.data_ptr<scalar_t>() + b * cols,
          row_means.data_ptr<scalar_t>() + b, n, cols, scalar_t(beta2_weight), scalar_t(eps1),
          param_norm);
      sum_u_squared += u_squared;
      sum_param_squared += param_squared;
    }
  });
  return {sum_u_squared, sum_param_squared};
}

// Pass 2 of a factored Adafactor step:
//   U = G * rsqrt(C_j) * sqrt(mean(R) / R_i), clipped by `clip`;
//   without momentum: W <- W * decay - alpha * clip * U;
//   with momentum:    M <- lerp(M, clip * U, 1 - beta1); W <- W * decay - alpha * M.
void adafactor_factored_apply(at::Tensor param, at::Tensor grad, at::Tensor row_var,
                              at::Tensor col_var, at::Tensor row_means, at::Tensor exp_avg,
                              bool use_momentum, double beta1, double decay, double alpha,
                              double clip) {
  check_tensor(param, param, "param");
  check_tensor(grad, param, "grad");
  check_tensor(row_var, param, "row_var");
  check_tensor(col_var, param, "col_var");
  check_tensor(row_means, param, "row_means");
  if (use_momentum) {
    check_tensor(exp_avg, param, "exp_avg");
    TORCH_CHECK(exp_avg.numel() == param.numel(), "exp_avg must match param");
  }
  const int64_t n = param.size(-2), cols = param.size(-1);
  const int64_t matrices = n * cols == 0 ? 0 : param.numel() / (n * cols);
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "memeff_adafactor_apply", [&] {
    using T = scalar_t;
    const T t_decay = T(decay), t_clip = T(clip), neg_alpha = T(-alpha);
    const T neg_alpha_clip = T(-alpha * clip);  // the eager path's value=-alpha * clip
    const T momentum_weight = T(1 - beta1);
    std::vector<T> scale_cols(cols);
    for (int64_t b = 0; b < matrices; ++b) {
      T* w = param.data_ptr<T>() + b * n * cols;
      const T* g = grad.data_ptr<T>() + b * n * cols;
      T* m = use_momentum ? exp_avg.data_ptr<T>() + b * n * cols : nullptr;
      const T* r = row_var.data_ptr<T>() + b * n;
      const T* c = col_var.data_ptr<T>() + b * cols;
      const T mean_r = row_means.data_ptr<T>()[b];
      for (int64_t j = 0; j < cols; ++j) scale_cols[j] = T(1) / std::sqrt(c[j]);  // rsqrt
      auto update_row = [&](int64_t i) {
        const T scale_row = std::sqrt(T(1) / r[i] * mean_r);  // reciprocal().mul_().sqrt_()
        T* wi = w + i * cols;
        const T* gi = g + i * cols;
        if (m == nullptr) {
          for (int64_t j = 0; j < cols; ++j) {
            const T u = gi[j] * scale_cols[j];
            wi[j] = wi[j] * t_decay + neg_alpha_clip * u * scale_row;
          }
        } else {
          T* mi = m + i * cols;
          for (int64_t j = 0; j < cols; ++j) {
            const T u = gi[j] * scale_cols[j] * scale_row * t_clip;
            const T mj = lerp(mi[j], u, momentum_weight);
            mi[j] = mj;
            wi[j] = wi[j] * t_decay + neg_alpha * mj;
          }
        }
      };
      at::parallel_for(0, n, rows_per_task(cols), [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) update_row(i);
      });
    }
  });
}

// ---- Adafactor, per-element second moment -----------------------------------------------

// Pass 1 of an unfactored step: V <- lerp(V, G^2, w2) + w2 * eps1. Returns
// [sum of G^2 / V, sum of W^2 (0 unless param_norm, as in the factored pass 1)].
std::vector<double> adafactor_unfactored_statistics(at::Tensor grad, at::Tensor param,
                                                    at::Tensor variance, double beta2_weight,
                                                    double eps1, bool param_norm) {
  check_tensor(param, param, "param");
  check_tensor(grad, param, "grad");
  check_tensor(variance, param, "variance");
  const int64_t numel = param.numel();
  TORCH_CHECK(grad.numel() == numel && variance.numel() == numel, "sizes must match the param");
  double sum_u_squared = 0.0, sum_param_squared = 0.0;
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "memeff_adafactor_unfactored_statistics", [&] {
    using T = scalar_t;
    const T* g = grad.data_ptr<T>();
    const T* w = param.data_ptr<T>();
    T* v = variance.data_ptr<T>();
    const T weight = T(beta2_weight), floor = T(beta2_weight * eps1);
    const int64_t blocks = row_blocks(numel, 1);
    std::vector<double> partial(2 * blocks, 0.0);
    at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) {
        const int64_t start = block_start(b, blocks, numel), stop = block_start(b + 1, blocks, numel);
        double u_squared = 0.0;
        for (int64_t j = start; j < stop; ++j) {
          const T square = g[j] * g[j];
          const T vj = lerp(v[j], square, weight) + floor;  // lerp_(squares, w2).add_(w2 * eps1)
          v[j] = vj;
          u_squared += double(square / vj);
        }
        partial[2 * b] = u_squared;
        if (param_norm) partial[2 * b + 1] = long_sum_of_squares(w + start, stop - start);
      }
    });
    for (int64_t b = 0; b < blocks; ++b) {
      sum_u_squared += partial[2 * b];
      sum_param_squared += partial[2 * b + 1];
    }
  });
  return {sum_u_squared, sum_param_squared};
}

// Pass 2 of an unfactored step: U = rsqrt(V) * G, then as adafactor_factored_apply.
void adafactor_unfactored_apply(at::Tensor param, at::Tensor grad, at::Tensor variance,
                                at::Tensor exp_avg, bool use_momentum, double beta1,
                                double decay, double alpha, double clip) {
  check_tensor(param, param, "param");
  check_tensor(grad, param, "grad");
  check_tensor(variance, param, "variance");
  if (use_momentum) check_tensor(exp_avg, param, "exp_avg");
  const int64_t numel = param.numel();
  TORCH_CHECK(!use_momentum || exp_avg.numel() == numel, "exp_avg must match param");
  AT_DISPATCH_FLOATING_TYPES(param.scalar_type(), "memeff_adafactor_unfactored_apply", [&] {
    using T = scalar_t;
    T* w = param.data_ptr<T>();
    const T* g = grad.data_ptr<T>();
    const T* v = variance.data_ptr<T>();
    T* m = use_momentum ? exp_avg.data_ptr<T>() : nullptr;
    const T t_decay = T(decay), t_clip = T(clip), neg_alpha = T(-alpha);
    const T neg_alpha_clip = T(-alpha * clip), momentum_weight = T(1 - beta1);
    at::parallel_for(0, numel, kMinTaskElements, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const T u = T(1) / std::sqrt(v[j]) * g[j];
        if (m == nullptr) {
          w[j] = w[j] * t_decay + neg_alpha_clip * u;
        } else {
          const T mj = lerp(m[j], u * t_clip, momentum_weight);
          m[j] = mj;
          w[j] = w[j] * t_decay + neg_alpha * mj;
        }
      }
    });
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
  module.doc() = "memeff's fused CPU optimizer kernels (see memeff/optim/kernels.cpp)";
  // the kernels touch no Python object, so other Python threads may run meanwhile
  using release_gil = pybind11::call_guard<pybind11::gil_scoped_release>;
  module.def("adamsn_step", &adamsn_step, release_gil(),
             "One AdamSN step, subsets = rows or columns");
  module.def("adafactor_factored_statistics", &adafactor_factored_statistics, release_gil(),
             "Pass 1 of a factored Adafactor step: row and column statistics, sum of U^2, "
             "optionally sum of W^2");
  module.def("adafactor_factored_apply", &adafactor_factored_apply, release_gil(),
             "Pass 2 of a factored Adafactor step: the update of W (and of M with beta1)");
  module.def("adafactor_unfactored_statistics", &adafactor_unfactored_statistics, release_gil(),
             "Pass 1 of an unfactored Adafactor step: the second moment, sum of U^2, "
             "optionally sum of W^2");
  module.def("adafactor_unfactored_apply", &adafactor_unfactored_apply, release_gil(),
             "Pass 2 of an unfactored Adafactor step");
}
