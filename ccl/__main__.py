"""`python -m pyccl` points at the entry points that exist."""
print("pyccl: use python -m pyccl.launch, python -m pyccl.topology, python -m pyccl.plan or python -m pyccl.doctor")
