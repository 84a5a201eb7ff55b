"""One epoch of training (OneCycleLR stepped every batch, gradient clipping) and evaluation.

Both return their metrics as a dict; the caller decides what to print, plot or save.
"""
import math
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data_file


class NonFiniteLoss(Exception):
    """The loss became NaN or infinite; the message names the step and learning rate."""


def train_one_epoch(model, optimizer, scheduler, batches, steps=None, *, clip_grad=1.0, augment=None,
                    label_smoothing=0.0, desc="train", progress=True, postfix_every=50):
    """Train one pass over `batches`, an iterable of (images, labels) of `steps` batches (default:
    len(batches)), e.g. data_file.batches(...) or a DataLoader; step the scheduler after every batch.

    Returns {"loss": mean training loss, "train_acc": running training accuracy in % (measured on each
    batch as it was trained, dropout and augmentation on), "steps", "seconds", "curve": [step, loss,
    train_acc, lr] every `postfix_every` steps, as running means over the epoch so far}. Raises
    NonFiniteLoss at the first step whose loss is NaN or infinite, before that step updates the weights.
    """
    model.train()
    steps = len(batches) if steps is None else steps
    params = [p for p in model.parameters() if p.requires_grad]  # walked once, not every step
    loss_sum, correct, seen, curve = 0.0, 0, 0, []
    bar = tqdm(batches, total=steps, desc=desc, disable=not progress, leave=False, mininterval=0.5,
               dynamic_ncols=True)
    start = time.perf_counter()
    for step, (x, y) in enumerate(bar, 1):
        if augment is not None:
            x = augment(x)
        output = model(x)
        if label_smoothing:
            loss = F.cross_entropy(output, y, label_smoothing=label_smoothing)
        else:
            loss = F.nll_loss(output, y)  # the models return log-probabilities
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise NonFiniteLoss(f"loss became {loss_value} at step {step} of {steps} "
                                f"(learning rate {scheduler.get_last_lr()[0]:.3g})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad:
            torch.nn.utils.clip_grad_norm_(params, clip_grad, foreach=True)
        optimizer.step()
        scheduler.step()
        loss_sum += loss_value * len(y)
        correct += (output.argmax(1) == y).sum()  # kept as a tensor, read only every postfix_every steps
        seen += len(y)
        if step % postfix_every == 0 or step == steps:
            point = [step, loss_sum / seen, 100 * int(correct) / seen, scheduler.get_last_lr()[0]]
            curve.append(point)
            bar.set_postfix(loss=f"{point[1]:.4f}", acc=f"{point[2]:.2f}%", lr=f"{point[3]:.2e}", refresh=False)
    seconds = time.perf_counter() - start
    bar.close()
    return {"loss": loss_sum / seen, "train_acc": 100 * int(correct) / seen, "steps": steps,
            "seconds": seconds, "curve": curve}


# Test-time augmentation: the image as it is and moved one pixel left, right, up and down (dx, dy).
TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))


@torch.inference_mode()
def predict_log_probs(model, images, tta=False):
    """The model's log-probabilities (B, 10) for a batch; with tta, the log of its softmax averaged over
    the image and its four one-pixel shifts (TTA_SHIFTS). The caller puts the model in eval mode."""
    if not tta:
        return model(images)
    h, w = images.shape[-2:]
    # Edge pixels repeat into the gap, as in data_file.random_shift_rotate; in MNIST they are background.
    padded = F.pad(images, (1, 1, 1, 1), mode="replicate")
    probs = sum(model(padded[..., 1 - dy:1 - dy + h, 1 - dx:1 - dx + w]).exp() for dx, dy in TTA_SHIFTS)
    return (probs / len(TTA_SHIFTS)).log()


@torch.inference_mode()
def evaluate(model, images, labels, batch_size=1000, details=False, tta=False):
    """Loss (mean negative log-likelihood) and accuracy in % over (images, labels), in eval mode, in order;
    with tta, of the prediction averaged over one-pixel shifts (predict_log_probs).

    With details=True also "confusion" (10x10 counts, rows true, columns predicted) and "mistakes": the
    16 most confidently wrong [index, true, predicted, confidence], most confident first.
    """
    model.eval()
    output = torch.cat([predict_log_probs(model, x, tta) for x, _ in data_file.batches(images, labels, batch_size)])
    pred = output.argmax(1)
    result = {"loss": F.nll_loss(output, labels, reduction="sum").item() / len(labels),
              "acc": 100 * (pred == labels).sum().item() / len(labels)}
    if details:
        result["confusion"] = torch.bincount(labels * 10 + pred, minlength=100).view(10, 10).tolist()
        confidence = output.max(1).values.exp()
        wrong = (pred != labels).nonzero().flatten()
        worst = wrong[confidence[wrong].argsort(descending=True)[:16]]
        result["mistakes"] = [[i, labels[i].item(), pred[i].item(), confidence[i].item()] for i in worst.tolist()]
    return result
