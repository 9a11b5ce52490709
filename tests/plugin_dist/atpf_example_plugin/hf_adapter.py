"""An example third-party architecture adapter for the ``huggingface`` backend.

It serves models whose ``config.model_type`` is ``fake_llama`` (a Llama-layout model under another
name), registered under the entry-point group ``atpframework.hf_architectures``.
"""

from atpframework.backends.huggingface import LlamaAdapter


class FakeLlamaAdapter(LlamaAdapter):
    """Same module layout as Llama."""
