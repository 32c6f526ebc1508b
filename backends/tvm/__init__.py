"""The TVM backend: lowbit's quantized IR compiled with Apache TVM for LLVM and CUDA.

One module per concern:

* ``ops``: the ``lowbit.tvm`` operators (quantized linears in TVM-friendly layouts) and
  weight packing; numpy only.
* ``lower``: the ``lower-tvm`` pass (QDQ linears + plan -> ``lowbit.tvm`` operators).
* ``kernels``: TE definitions (packed-weight decode, activation quantization).
* ``relax_import``: lowered IR -> Relax (lowbit's operators by lowbit, the float rest by
  TVM's ONNX importer).
* ``targets``, ``build``: target parsing; fusion, dlight schedules, ``tvm.compile``, export.
* ``tune``: MetaSchedule tuning of the quantized matmuls at static sequence lengths
  (``--tune``): specialised entry functions, the tuning database, applying its records.
* ``cuda``: nvcc, the embedded fatbin, PTX inspection.
* ``backend``: the ``Backend`` object (``lowbit.backends`` entry point ``tvm``): checks, recipe
  swap, which layer plans the kernels run, build into the artifact, evaluation session, loading.
* ``runtime``: loading and running an artifact with the TVM runtime alone.

Only ``ops``, ``lower``, ``backend`` and ``runtime`` import without TVM's compiler; the others need
``pip install 'lowbit[tvm]'``.
"""
