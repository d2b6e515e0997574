import os

# The kernel tests run the real Triton kernel on the CPU in the interpreter; the variable
# must be set before anything imports triton.
os.environ.setdefault("TRITON_INTERPRET", "1")
