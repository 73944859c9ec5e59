import torch

import apd_ext


def test_version_and_ops_registered():
    assert apd_ext.__version__
    for name in ("sample_draft", "mixture_accept", "accept_prefix", "window_attention"):
        assert hasattr(torch.ops.apd, name), name


def test_build_info_reports_cpu_kernels():
    info = apd_ext.build_info()
    assert info["cpu"] is True
    assert info["cuda"] == torch._C._dispatch_has_kernel_for_dispatch_key("apd::sample_draft", "CUDA")
