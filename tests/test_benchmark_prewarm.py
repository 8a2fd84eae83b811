from randattn.benchmark.grid import RAND, SPEC_GRID
from randattn.benchmark.prewarm import kernel_configurations, prewarm


def test_one_point_per_compiled_configuration():
    configs = kernel_configurations(SPEC_GRID)
    distinct = {(p.embed_dim, p.num_heads, p.num_features, p.kernel) for p in SPEC_GRID.points() if p.model == RAND}
    assert len(configs) == len(distinct) == 4 * 3 * 3 * 2
    assert {(p.embed_dim, p.num_heads, p.num_features, p.kernel) for p in configs} == distinct
    assert all(p.seq_len == min(SPEC_GRID.seq_lens) and p.model == RAND for p in configs)


def test_prewarm_without_cuda_does_nothing():
    import torch

    if not torch.cuda.is_available():
        assert prewarm() == []
