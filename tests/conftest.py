import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch

# Tiny models gain nothing from a second thread, and OpenMP threads that wait
# on a busy core can slow a test a hundredfold: one thread keeps times steady.
torch.set_num_threads(1)
