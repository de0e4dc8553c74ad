"""Set Transformer blocks: equivariance / invariance, masks, shapes."""

from __future__ import annotations

import pytest
import torch

from perceiver_stream.set_transformer import ISAB, MAB, PMA, SAB


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def padded(x: torch.Tensor, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` followed by ``extra`` garbage elements, and the mask that hides them."""
    junk = 1e3 * torch.randn(x.shape[0], extra, x.shape[2])
    mask = torch.cat([torch.ones(x.shape[:2], dtype=torch.bool), torch.zeros(x.shape[0], extra, dtype=torch.bool)], 1)
    return torch.cat([x, junk], 1), mask


@pytest.mark.parametrize("block", [lambda: SAB(6, 8, num_heads=2), lambda: ISAB(6, 8, 3, num_heads=2)])
def test_equivariant_and_padding_invariant(block):
    m = block().eval()
    x = torch.randn(2, 7, 6)
    out = m(x)
    assert out.shape == (2, 7, 8)
    perm = torch.randperm(7)
    torch.testing.assert_close(m(x[:, perm]), out[:, perm], atol=1e-5, rtol=1e-4)
    xp, mask = padded(x, 4)
    outp = m(xp, mask)
    torch.testing.assert_close(outp[:, :7], out, atol=1e-5, rtol=1e-4)
    assert torch.all(outp[:, 7:] == 0)


def test_pma_invariant_and_masked():
    m = PMA(8, num_seeds=2, num_heads=2).eval()
    z = torch.randn(3, 5, 8)
    out = m(z)
    assert out.shape == (3, 2, 8)
    torch.testing.assert_close(m(z[:, torch.randperm(5)]), out, atol=1e-5, rtol=1e-4)
    zp, mask = padded(z, 6)
    torch.testing.assert_close(m(zp, mask), out, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(m(zp), out, atol=1e-3)  # without the mask the garbage does matter


def test_mab_widths_and_empty_keys():
    m = MAB(5, 7, 8, num_heads=4)
    x, y = torch.randn(2, 3, 5), torch.randn(2, 4, 7)
    assert m(x, y).shape == (2, 3, 8)
    out = m(x, y, torch.tensor([[True, True, False, False], [False] * 4]))
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    no_ln = MAB(8, 8, 8, ln=False)
    assert not any(isinstance(mod, torch.nn.LayerNorm) for mod in no_ln.modules())


def test_stack_pools_a_set():
    """ISAB -> SAB -> PMA: a whole Set Transformer gives one vector per set, order-free."""
    net = torch.nn.ModuleList([ISAB(3, 16, 4, num_heads=2), SAB(16, 16, num_heads=2), PMA(16, num_heads=2)]).eval()

    def run(x, mask=None):
        h = net[1](net[0](x, mask), mask)
        return net[2](h, mask)[:, 0]

    x = torch.randn(4, 9, 3)
    xp, mask = padded(x, 3)
    torch.testing.assert_close(run(xp, mask), run(x), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(run(x[:, torch.randperm(9)]), run(x), atol=1e-5, rtol=1e-4)
