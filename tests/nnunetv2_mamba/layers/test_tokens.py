"""Token-order helpers: exact inverses and the scan orders they produce."""
import itertools

import pytest
import torch
from torch import nn

from nnunetv2_mamba.layers import tokens as tk


def cumulative(tokens):
    """A toy order-sensitive mixer: running sum along the token axis."""
    return tokens.cumsum(dim=1)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (1, 2, 3, 4, 5)])
def test_tokens_round_trip_and_c_order(shape):
    x = torch.randn(*shape)
    t = tk.to_tokens(x)
    assert t.shape == (shape[0], x[0, 0].numel(), shape[1])
    # C order: the last spatial axis varies fastest.
    assert torch.equal(t[0, 1], x[0, :, *([0] * (x.dim() - 3)), 1])
    assert torch.equal(tk.from_tokens(t, x.shape[2:]), x)
    assert torch.equal(tk.to_tokens(x.transpose(2, 3).contiguous().transpose(2, 3)), t)  # non-contiguous input


def test_reverse_and_run_reversed():
    t = torch.randn(2, 7, 3)
    assert torch.equal(tk.reverse_tokens(tk.reverse_tokens(t)), t)
    out = tk.run_reversed(cumulative, t)
    expected = t.flip(1).cumsum(1).flip(1)  # suffix sums
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels-last"])
@pytest.mark.parametrize("order", list(itertools.permutations(range(3))))
def test_run_in_axis_order_scans_permuted_axes(order, channels_last):
    x = torch.randn(1, 2, 3, 4, 5)
    seen = []

    def mixer(tokens):
        seen.append((tokens.is_contiguous(), tokens.data_ptr()))
        return cumulative(tokens)

    source = x.contiguous(memory_format=torch.channels_last_3d) if channels_last else x
    out = tk.run_in_axis_order(mixer, source, order)
    assert out.shape == x.shape
    # a channels-last map's tokens reach the mixer contiguous (its copy is channels last in the new order), and the
    # C order reads the map itself; a contiguous map keeps the channel-major copy (its tokens are a transposed view)
    assert [contiguous for contiguous, _ in seen] == [channels_last]
    if channels_last and order == (0, 1, 2):  # no copy: the tokens are the map's memory, the result channels last
        assert seen[0][1] == source.data_ptr() and out.is_contiguous(memory_format=torch.channels_last_3d)
    # Reference: move the axes so that `order` is C order, take the running sum, move back.
    perm = x.permute(0, 1, *[a + 2 for a in order])
    running = perm.flatten(2).cumsum(-1).reshape(perm.shape)
    inverse = [0, 1] + [2 + order.index(a) for a in range(3)]
    torch.testing.assert_close(out, running.permute(*inverse))


def test_run_in_axis_order_rejects_non_permutation():
    with pytest.raises(ValueError, match="permutation"):
        tk.run_in_axis_order(cumulative, torch.randn(1, 1, 2, 2, 2), (0, 0, 1))


def test_frame_interleave_is_transpose_and_inverse():
    nframes, positions = 3, 4
    frame_major = torch.arange(nframes * positions, dtype=torch.float32).view(1, -1, 1)
    interleaved = tk.frame_interleave(frame_major, nframes)
    # position p of frame f sits at index f*P + p; interleaved puts it at p*T + f
    for f in range(nframes):
        for p in range(positions):
            assert interleaved[0, p * nframes + f, 0] == f * positions + p
    assert torch.equal(tk.frame_deinterleave(interleaved, nframes), frame_major)
    with pytest.raises(ValueError, match="multiple of the number of frames"):
        tk.frame_interleave(torch.zeros(1, 10, 1), 3)


def test_combine_and_bidirectional_mixer():
    a, b = torch.randn(2, 5, 3), torch.randn(2, 5, 3)
    torch.testing.assert_close(tk.combine([a, b], "sum"), a + b)
    torch.testing.assert_close(tk.combine([a, b], "mean"), (a + b) / 2)
    with pytest.raises(ValueError):
        tk.combine([a], "max")

    class Cum(nn.Module):
        def forward(self, t):
            return t.cumsum(1)

    mixer = tk.BidirectionalMixer(Cum(), Cum(), nn.Identity())
    t = torch.randn(1, 6, 2)
    torch.testing.assert_close(mixer(t), t.cumsum(1) + t.flip(1).cumsum(1).flip(1))


def test_reverse_frames_keeps_the_order_inside_each_frame():
    nframes, positions = 3, 4
    tokens = torch.arange(nframes * positions, dtype=torch.float32).view(1, -1, 1)
    reversed_frames = tk.reverse_frames(tokens, nframes)
    assert reversed_frames[0, :, 0].tolist() == [8, 9, 10, 11, 4, 5, 6, 7, 0, 1, 2, 3]
    assert torch.equal(tk.reverse_frames(reversed_frames, nframes), tokens)
    out = tk.run_frames_reversed(cumulative, tokens, nframes)
    # Scanned frames 3, 2, 1: the last frame's tokens come first, the first frame's see everything before.
    assert out[0, -1, 0] == 8 + 9 + 10 + 11
    assert out[0, 0, 0] == (8 + 9 + 10 + 11) + (4 + 5 + 6 + 7) + 0
    with pytest.raises(ValueError, match="multiple of the number of frames"):
        tk.reverse_frames(torch.zeros(1, 10, 1), 3)
