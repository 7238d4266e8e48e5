"""Kernel and model measurement: the kernel table (``kernels``), thread and token scaling
(``scaling``), the torch op against its twin (``bridges_bench``), FLOPs and throughput
(``models_bench``), every timing through one module (``timing``) and every verdict in one
form (``checks``); ``commands`` runs them for the command line (``alignscan bench``,
``alignscan kernels``, ``alignscan flops``, ``alignscan models``). ``gpu_run`` is the one
prepared command for a lent GPU: ``python -m alignscan.bench.gpu_run``."""
