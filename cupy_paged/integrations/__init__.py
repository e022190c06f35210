"""Adapters that serve other libraries' attention calls from ``cupy_paged.paged_attention``.

``cupy_paged.integrations.transformers``: Hugging Face transformers' continuous batching
(``generate_batch`` over its ``PagedAttentionCache``). Importing an adapter module imports
neither transformers nor torch; they are imported when the adapter is registered or called.
"""
