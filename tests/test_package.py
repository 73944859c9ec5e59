import torch

import apd_ext


def test_version_and_ops_registered():
    assert apd_ext.__version__
    for name in ("sample_draft", "mixture_accept", "accept_prefix", "window_attention"):
        assert hasattr(torch.ops.apd, name), name
