"""mla_plugin for SGLang: the `mla_plugin` attention backend through SGLang's plugin entry points.

Importing this package imports no SGLang; `mla_plugin.sglang.registration.register` (the
`sglang.srt.plugins` entry point) does the work inside SGLang's processes.
"""
