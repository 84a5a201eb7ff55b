"""The networks: tiny CNNs for 28x28 MNIST digits, each returning log-probabilities (B, 10).

    Net       seed-1 network, 13,242 parameters: two 3x3 convs (1->4->8) with max-pooling, FC 392->32->10.

Build one by name with `build_model(name)`; `count_parameters(model)` gives its trainable size.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Net(nn.Module):
    """The seed-1 CNN. Its true size is 13,242 parameters (40 + 296 + 12,576 + 330)."""

    def __init__(self, dropout=0.005):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, kernel_size=3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.dropout1 = nn.Dropout(dropout)
        self.fc1 = nn.Linear(8 * 7 * 7, 32)  # two 2x pools take 28x28 down to 7x7
        self.dropout2 = nn.Dropout(dropout)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):                       # (B, 1, 28, 28)
        x = self.pool(F.relu(self.conv1(x)))    # (B, 4, 14, 14)
        x = self.pool(F.relu(self.conv2(x)))    # (B, 8, 7, 7)
        x = torch.flatten(x, 1)                 # (B, 392)
        x = F.relu(self.fc1(self.dropout1(x)))  # (B, 32)
        x = self.fc2(self.dropout2(x))          # (B, 10)
        return F.log_softmax(x, dim=1)


MODELS = {
    "net": Net,
}


def build_model(name, **kwargs):
    """Return a new network by its name in MODELS; kwargs go to its constructor."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
    return MODELS[name](**kwargs)


def count_parameters(model):
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
