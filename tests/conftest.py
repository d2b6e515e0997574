import os
import sys

# The kernel tests run the real Triton kernel on the CPU in the interpreter; the variable
# must be set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
