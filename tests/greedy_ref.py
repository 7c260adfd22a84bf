"""Greedy decoding by its definition, over any reference forward, with the argmax margin of every step.

A generate() of a particular transformers/peft release is not the definition of greedy decoding; this is:
re-run the whole sequence each step and append the argmax of the last position's logits. The top-2 logit
gap of each step says how far a step is from a tie: past a step whose gap is below a margin, a 1e-6 float
difference between two correct implementations may pick the other token, and everything after it differs.
"""

import torch

MARGIN = 1e-4  # top-2 logit gap below which a step counts as a near-tie (fp32 logits agree to ~1e-6)


@torch.no_grad()
def reference_greedy(forward, prompt: list[int], n: int):
    """forward(ids [1, T]) -> logits [1, T, V]. Returns (n tokens, n top-2 gaps)."""
    seq = torch.tensor([prompt])
    tokens, gaps = [], []
    for _ in range(n):
        last = forward(seq)[0, -1].float()  # [V]
        top2 = last.topk(2).values
        nxt = int(last.argmax())
        tokens.append(nxt)
        gaps.append(float(top2[0] - top2[1]))
        seq = torch.cat([seq, torch.tensor([[nxt]])], dim=1)
    return tokens, gaps


def decisive_length(gaps: list[float], margin: float = MARGIN) -> int:
    """Steps before the first near-tie: a correct implementation must agree on all of them."""
    return next((i for i, g in enumerate(gaps) if g < margin), len(gaps))


def assert_greedy_equal(ours: list[int], ref: list[int], gaps: list[float], min_decisive: int):
    """ours equals ref on every step before the first near-tie, and at least min_decisive steps are compared.

    Each compared step had the same inputs in both (all earlier tokens equal) and a clear winner.
    """
    k = decisive_length(gaps)
    assert k >= min_decisive, f"only {k} decisive steps (gaps {gaps[: k + 1]}): the test model is too close to ties"
    assert ours[:k] == ref[:k], f"differ within the first {k} decisive steps: {ours} vs {ref}"
