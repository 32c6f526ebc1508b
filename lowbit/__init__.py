"""lowbit: a quantization compiler for transformer models.

    import lowbit
    result = lowbit.compile("stories260K.bin", "out/", recipe="w8a8")
    print(result.accuracy["perplexity_increase"])

``lowbit.compile`` takes a path (``.onnx``, Hugging Face folder, llama2.c
``.bin``) or an ``nn.Module`` with ``example_inputs``; see
``lowbit.compiler.driver.compile`` for every option.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lowbit")
except PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"


def compile(source, output, **options):  # noqa: A001
    """Compile ``source`` into the artifact folder ``output`` (see ``lowbit.compiler.driver.compile``)."""
    from lowbit.compiler.driver import compile as _compile

    return _compile(source, output, **options)


__all__ = ["compile", "__version__"]
