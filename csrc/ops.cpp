// Every fastmask op's schema, declared once. The CPU kernel of op <op> registers in csrc/<op>.cpp with
// TORCH_LIBRARY_IMPL(fastmask, CPU, m), its CUDA kernel (if any) in csrc/cuda/<op>_cuda.cpp, with the kernels
// themselves in csrc/cuda/<op>_kernels.cu; <op> is the op's name without the trailing _ of in-place ops (soft_mask_
// shares csrc/soft_mask.cpp with soft_mask). Python reaches them as torch.ops.fastmask.<name> after
// `import fastmask._C` (fastmask/ops/backend.py does that and picks the backend).
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
  // bounds: float32 [4, n], rows lo_b, hi_b, lo_l, hi_l: the min / max of the whole tensors the given ones are
  // pieces of (shards, fastmask/parallel/fsdp.py); None: each tensor's own.
  m.def(
      "soft_mask(Tensor[] imp_bias, Tensor[] imp_loss, float eps=1e-10, bool apply_tanh=True, Tensor? bounds=None) "
      "-> Tensor[]");
  // The same, written into imp_bias (float32, dense) instead of new tensors: no memory beyond the importances.
  m.def(
      "soft_mask_(Tensor(a!)[] imp_bias, Tensor[] imp_loss, float eps=1e-10, bool apply_tanh=True, "
      "Tensor? bounds=None) -> ()");
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
  // One pass of the percentile's radix selection (np.percentile over the concatenation of the tensors, BMFT's global
  // threshold, docs/algorithm.md §4), whose driver is Python: fastmask/ops/radix.py picks each pass's prefixes and
  // digit width, decodes the selected keys and interpolates as numpy does; summed by all-reduce, the same pass serves a process
  // group. int64 counts of shape [len(prefixes), 2^digit_bits]: row p bins the elements whose top prefix_bits
  // order-key bits (csrc/order_keys.h) equal prefixes[p] by their next digit_bits key bits. The first pass
  // (prefix_bits=0) reads every element and raises on NaN, naming the tensor.
  m.def("radix_histogram(Tensor[] tensors, int[] prefixes, int prefix_bits, int digit_bits) -> Tensor");
  // Hard masks x > threshold (x >= threshold when inclusive), per tensor, as numpy compares: layout "bool" or "bits"
  // (ceil(numel / 8) int8 bytes of packed bits, np.packbits(bitorder="little") order).
  m.def("hard_mask(Tensor[] tensors, float threshold, bool inclusive=False, str layout=\"bool\") -> Tensor[]");
}
