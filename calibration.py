"""Confidence that means what it says, and the line under which a reader declines: the temperature and threshold of
a network with a "not a digit" output (model.ResSENet's not_digit), chosen on validation digits after training.

    temperature   the one number that divides every logit, chosen (a grid of 0.25-3 by 0.01) for the least negative
                  log-likelihood of the validation digits' labels: temperature scaling (Guo et al., 2017). Label
                  smoothing leaves a network underconfident (a temperature under 1 sharpens it).
    threshold     the highest confidence (the top digit's probability, after the temperature) that KEEP of the
                  validation digits and KEEP_OTHERS of other writers' (the 13 UCI writers' choose half, in every
                  form) reach: under it a reader says "not a digit". Other writers' digits read less surely than
                  MNIST's: on MNIST alone the threshold declined 8.5% of theirs (docs/experiments.md).
    ECE           expected calibration error: over 15 equal bins of confidence, the gap between confidence and
                  accuracy weighted by the share of digits in the bin, in %.

Everything here is arithmetic on log-probabilities already computed (model_train.calibrate runs the network).
"""
import torch

from model import not_digit_log_probability

KEEP = 0.995  # the share of validation digits a declining reader still reads ...
KEEP_OTHERS = 0.98  # ... and of other writers' digits (at 0.99 it let a third more non-digits through)
TEMPERATURES = torch.arange(25, 301) / 100  # the grid the temperature is chosen from
ECE_BINS = 15


def logits(views):
    """The 11 logits (V, N, 11), up to a constant per image, of a not_digit network's digit log-probabilities at
    temperature 1, `views` (V, N, 10) (one per test-time shift, or one): the digits' and log P(not a digit)."""
    return torch.cat([views, not_digit_log_probability(views)[..., None]], -1)


def digit_probabilities(logit_views, temperature):
    """(N, 10): the digits' probabilities at `temperature`, averaged over the views as test-time augmentation
    averages them."""
    return (logit_views / temperature).softmax(-1)[..., :10].mean(0)


def expected_calibration_error(probabilities, labels, bins=ECE_BINS):
    """ECE in % of (N, 10) probabilities against labels (N,): the top digit's probability as the confidence."""
    confidence, predicted = probabilities.max(1)
    right = (predicted == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=confidence.dtype)
    which = torch.bucketize(confidence, edges[1:-1])  # bin i holds (edges[i], edges[i+1]]
    error = 0.0
    for i in range(bins):
        inside = which == i
        if inside.any():
            error += inside.double().mean() * (confidence[inside].double().mean() - right[inside].mean()).abs()
    return 100 * float(error)


def choose(views, labels):
    """The temperature for a not_digit network from its validation digits' log-probabilities at temperature 1
    (V, N, 10) and labels (N,): {"temperature", "val_ece_before", "val_ece"}."""
    logit_views = logits(views.double())
    nll = [torch.nn.functional.nll_loss(digit_probabilities(logit_views, t).log(), labels).item()
           for t in TEMPERATURES.double()]
    temperature = float(TEMPERATURES[min(range(len(nll)), key=nll.__getitem__)])
    return {"temperature": temperature,
            "val_ece_before": expected_calibration_error(digit_probabilities(logit_views, 1.0), labels),
            "val_ece": expected_calibration_error(digit_probabilities(logit_views, temperature), labels)}


def threshold(confidence, keep=KEEP):
    """The highest confidence that at least `keep` of `confidence` (N,) (validation digits' top probabilities, as
    the network computes them) reach."""
    return float(confidence.sort().values[int((1 - keep) * len(confidence))])
