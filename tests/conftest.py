import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest
import torch

# Tiny models gain nothing from a second thread, and OpenMP threads that wait
# on a busy core can slow a test a hundredfold: one thread keeps times steady.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one thread, whatever the one before it set."""
    torch.set_num_threads(1)
    yield
