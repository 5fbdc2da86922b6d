// Every fastmask op's schema, declared once. The CPU kernels register in csrc/<op>.cpp with
// TORCH_LIBRARY_IMPL(fastmask, CPU, m); the CUDA kernels in csrc/cuda/<op>_cuda.cpp. Python reaches them as
// torch.ops.fastmask.<name> after `import fastmask._C` (fastmask/ops.py does that and picks the backend).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// An empty Python module: importing fastmask._C loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fastmask, m) {
  // I_b += g_b^2 and I_l += g_l^2 over every tensor pair, one pass (SWiFT Eq. 7-8, diagonal Fisher).
  m.def("fisher_accumulate_(Tensor(a!)[] imp_bias, Tensor(b!)[] imp_loss, Tensor[] grad_bias, Tensor[] grad_loss) -> ()");
  // Per tensor: R = norm(I_b) / (norm(I_l) + eps), norm = min-max with the max == min guard; M = tanh(R) when
  // apply_tanh (SWiFT Eq. 9) else the raw ratio R (BMFT's score before the percentile). Returns float32 masks.
  m.def("soft_mask(Tensor[] imp_bias, Tensor[] imp_loss, float eps=1e-10, bool apply_tanh=True) -> Tensor[]");
  // The same, written into imp_bias (float32, dense) instead of new tensors: no memory beyond the importances.
  m.def("soft_mask_(Tensor(a!)[] imp_bias, Tensor[] imp_loss, float eps=1e-10, bool apply_tanh=True) -> ()");
  // Masked Adam / AdamW step over a group of same-device, same-dtype tensors. masks[i] may be None (no mask),
  // float32 / bf16 (soft), uint8 (quantised, m/255) or bool (hard). state_steps are already incremented.
  m.def(
      "masked_adam_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
      "Tensor(d!)[] max_exp_avg_sqs, Tensor[] state_steps, Tensor?[] masks, *, float lr, float beta1, float beta2, "
      "float weight_decay, float eps, bool amsgrad, bool maximize, bool decoupled_weight_decay, bool mask_update, "
      "Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // Masked SGD step (momentum, dampening, nesterov, weight decay). first_step: momentum buffers are
  // uninitialised and become d_p, as in torch.optim.SGD.
  m.def(
      "masked_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor?[] masks, *, "
      "float lr, float weight_decay, float momentum, float dampening, bool nesterov, bool maximize, "
      "bool first_step, bool mask_update, Tensor? grad_scale=None, Tensor? found_inf=None) -> ()");
  // The q-th percentile (q in [0, 100]) of every element of `tensors` taken together, equal to np.percentile over
  // their concatenation (methods linear, lower, higher, nearest, midpoint), as a 0-d float64 tensor; BMFT's global
  // threshold (spec §4). Radix selection over the floats' bit patterns, no concatenated copy. NaN raises.
  m.def("percentile(Tensor[] tensors, float q, str method=\"linear\") -> Tensor");
  // One pass of that selection, exposed so it can run across ranks (fastmask.distributed): int64 counts of shape
  // [len(prefixes), 2^digit_bits]; row p bins the elements whose top prefix_bits order-key bits equal prefixes[p]
  // by their next digit_bits key bits.
  m.def("radix_histogram(Tensor[] tensors, int[] prefixes, int prefix_bits, int digit_bits) -> Tensor");
  // Hard masks x > threshold (x >= threshold when inclusive), per tensor, as numpy compares: layout "bool",
  // "uint8" (0 / 1) or "packed" (ceil(numel / 8) bytes, np.packbits(bitorder="little") order).
  m.def("hard_mask(Tensor[] tensors, float threshold, bool inclusive=False, str layout=\"bool\") -> Tensor[]");
}
