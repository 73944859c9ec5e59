// The one place where every apd op's schema is declared. Implementations are
// registered per dispatch key in ops_cpu_*.cpp and ops_cuda_*.cpp; the fake
// (meta) kernels live in python/apd_ext/ops.py.
#include <Python.h>
#include <torch/library.h>

TORCH_LIBRARY(apd, m) {
  // Sampling core (DESIGN.md §4).
  // logits [B, M, V] (fp32/bf16/fp16); pos_start, valid_len, steps [B] int; seeds [B] int64.
  // compat: "" (the correct sampler) or "official" (the released code's).
  // ban_start, ban_end: banned ids [ban_start, ban_end) read as -inf (default none).
  // row_*: optional [B] per-row settings that replace the scalar of the same name
  // (float32 temperature / top_p, float32/64 R; int top_k; int compat 1 = "official"; int
  // acceptance 1 = "argmax", 0 = "coupled"): one call serves rows that differ.
  m.def(
      "sample_draft(Tensor logits, Tensor pos_start, Tensor valid_len, Tensor seeds, Tensor steps, "
      "float temperature, int top_k, float top_p, str compat, int ban_start=0, int ban_end=0, "
      "Tensor? row_temperature=None, Tensor? row_top_k=None, Tensor? row_top_p=None, "
      "Tensor? row_compat=None) -> Tensor");
  // dllm_logits [B, M, V_D], ar_logits [B, M, V_A], draft [B, M] int64, eos_ids int64 [E]
  // (every row) or [B, E] (per row, padded with -1).
  // acceptance: "coupled" | "argmax". Returns (target [B, M] int64, n_accept [B] int64).
  m.def(
      "mixture_accept(Tensor dllm_logits, Tensor ar_logits, Tensor draft, Tensor pos_start, "
      "Tensor valid_len, Tensor seeds, Tensor steps, float R, float temperature, int top_k, "
      "float top_p, Tensor eos_ids, str acceptance, str compat, int ban_start=0, int ban_end=0, "
      "Tensor? row_R=None, Tensor? row_temperature=None, Tensor? row_top_k=None, Tensor? row_top_p=None, "
      "Tensor? row_acceptance=None, Tensor? row_compat=None) -> (Tensor, Tensor)");
  // draft, target [B, M] int64; valid_len [B]; eos_ids [E] or [B, E] int64 -> n_accept [B] int64.
  m.def("accept_prefix(Tensor draft, Tensor target, Tensor valid_len, Tensor eos_ids) -> Tensor");
  // Masked-window attention (DESIGN.md §5).
  // q [B, Lq, Hq, D], k_cache / v_cache [B, Lmax, Hkv, D]; q_start, q_len, kv_len [B] int.
  m.def(
      "window_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor q_start, Tensor q_len, "
      "Tensor kv_len, bool causal, float scale) -> Tensor");
}

// `import apd_ext._C` loads the library and runs the registrations above; the
// module itself exposes nothing (ops are reached through torch.ops.apd).
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
