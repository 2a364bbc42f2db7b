"""The authors' Algorithm 1, literally: the oracle for tests and the baseline for benchmarks."""

import torch


def algorithm1_step(hebb, h, y, eta, w, alpha):
    """One training step of DHP-Softmax with a Python loop over the classes present in the batch.

    Returns the logits and the updated trace (still attached to the graph).
    """
    columns = list(hebb.unbind(dim=1))  # a list, not in-place writes: autograd needs the old values
    for c in torch.unique(y).tolist():
        class_mean = h[y == c].mean(dim=0)
        columns[c] = (1 - eta) * columns[c] + eta * class_mean
    hebb = torch.stack(columns, dim=1)
    return h @ (w + alpha * hebb), hebb
