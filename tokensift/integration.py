"""Use tokensift the way transformers is used: a context manager around ``model.generate`` and a
registered pipeline.

- :func:`apply`: ``with tokensift.apply(model, "snapkv", budget=256) as cache:`` switches the
  model to the tokensift attention function, installs the input-ids hook, yields a selecting
  cache to pass as ``past_key_values``, and on exit puts the model back as it was.
- :class:`TokensiftPipeline`, registered as the task ``"tokensift-generation"``:
  ``pipeline("tokensift-generation", model=model, tokenizer=tokenizer, policy="snapkv", budget=256)``
  then ``pipe(context=document, question="...")``; the question is fed after the context has
  been compressed (as ``generate(..., question=)``).
"""

from __future__ import annotations

from contextlib import contextmanager

from transformers import AutoModelForCausalLM, Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from tokensift.attention import NAME
from tokensift.engine import make_cache
from tokensift.errors import TokensiftError
from tokensift.generate import generate, resolve_policy
from tokensift.hooks import install_cache_hooks, install_input_ids_hook, remove_cache_hooks, remove_input_ids_hook

TASK = "tokensift-generation"


@contextmanager
def apply(model, policy=None, **params):
    """Yield a selecting cache for ``model`` under ``policy`` (a name, an expression or a Policy;
    ``params`` such as ``budget=`` go to ``build_policy``); restore the model's attention
    implementation and remove the hooks it installed on exit."""
    if params and not isinstance(policy, str):
        raise TokensiftError("apply(): parameters such as budget= go with a policy name, e.g. apply(model, 'snapkv', budget=256)")
    previous = getattr(model.config, "_attn_implementation", None)
    installed = install_input_ids_hook(model)
    installed_cache_hooks = install_cache_hooks(model)
    try:
        yield make_cache(model, resolve_policy(policy, **params))
    finally:
        if installed:
            remove_input_ids_hook(model)
        if installed_cache_hooks:
            remove_cache_hooks(model)
        if previous is not None and previous != NAME:
            model.set_attn_implementation(previous)


class TokensiftPipeline(Pipeline):
    """Text generation under a tokensift policy: ``pipe(context=..., question=...)`` returns
    ``[{"generated_text": ..., "kv_bytes": ..., "kv_bytes_full": ..., "policy": ...}]``.

    Construction or call keywords: ``policy``, ``budget``, ``ratio`` (the policy), and any
    keyword of :func:`tokensift.generate.generate` (``max_new_tokens``, ``generation_config``,
    ``streamer``...). The pipeline runs on the model's device unless ``device=`` says otherwise.
    """

    POLICY_KEYS = ("policy", "budget", "ratio")

    def __init__(self, model, *args, device=None, **kwargs):
        super().__init__(model, *args, device=model.device if device is None else device, **kwargs)

    def __call__(self, context=None, question=None, **kwargs):
        """Generate from ``context`` (a string, or a list for several), ``question`` fed after it."""
        if question is not None:
            kwargs["question"] = question
        return super().__call__(context, **kwargs)

    def _sanitize_parameters(self, question=None, **kwargs):
        preprocess = {} if question is None else {"question": question}
        return preprocess, kwargs, {}

    def preprocess(self, context, question=None):
        return {"context": context, "question": question}

    def _forward(self, inputs, policy=None, budget=None, ratio=None, **generate_kwargs):
        chosen = resolve_policy(policy, **{k: v for k, v in (("budget", budget), ("ratio", ratio)) if v is not None})
        result = generate(self.model, self.tokenizer, inputs["context"], question=inputs["question"],
                          policy=chosen, **generate_kwargs)
        return {"result": result}

    def postprocess(self, outputs):
        result = outputs["result"]
        return [{"generated_text": result.text[0], "kv_bytes": result.kv_bytes, "kv_bytes_full": result.kv_bytes_full,
                 "policy": result.policy}]


def register_pipeline() -> None:
    """Register :class:`TokensiftPipeline` as the transformers task ``"tokensift-generation"``."""
    PIPELINE_REGISTRY.register_pipeline(TASK, pipeline_class=TokensiftPipeline, pt_model=AutoModelForCausalLM, type="text")


register_pipeline()

__all__ = ["apply", "TokensiftPipeline", "register_pipeline", "TASK"]
