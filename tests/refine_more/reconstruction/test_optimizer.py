"""The fused Adam of every stage computes the update of torch's reference (foreach) Adam."""
import torch

from refine_more.reconstruction.optimizer import adam


def _train(opt_factory, steps=20):
    torch.manual_seed(0)
    table = torch.nn.Parameter(torch.randn(4096, 2))        # a hash table's shape
    mlp = torch.nn.Linear(2, 3)
    x, y = torch.randint(0, 4096, (512,)), torch.randn(512, 3)
    opt = opt_factory([table, *mlp.parameters()])
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = ((mlp(table[x]) - y) ** 2).mean()
        loss.backward()
        opt.step()
    return torch.cat([table.detach().flatten(), *(p.detach().flatten() for p in mlp.parameters())])


def test_fused_adam_equals_reference_adam():
    opt = adam([torch.nn.Parameter(torch.zeros(3))], 1e-2)
    assert opt.defaults["fused"] is True                     # the CPU takes the fused kernel
    fused = _train(lambda p: adam(p, 1e-2))
    reference = _train(lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False))
    moved = (reference - _train(lambda p: torch.optim.SGD(p, lr=0.0))).abs().max()
    assert moved > 1e-2                                      # the comparison is of trained values
    assert torch.allclose(fused, reference, rtol=1e-5, atol=1e-6)


def test_complex_parameters_fall_back_to_the_unfused_kernel():
    opt = adam([torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))], 1e-2)
    assert not opt.defaults.get("fused")
