"""Provider simulator: an OpenAI-compatible server that answers with synthetic completions.

Switchboard's tests and embedded stack call it through litellm over real HTTP, with latency
profiles shaped like real model classes and injectable faults, because there is no internet and
no provider key. It always says it is a simulator; it is not a model.
"""
