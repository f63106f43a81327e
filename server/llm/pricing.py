"""What a completion costs: tokens times the configured (or default) price of its model."""

from __future__ import annotations

from decimal import ROUND_CEILING, Decimal

from server.config import Settings

_MICRO = Decimal("0.000001")
_THOUSAND = Decimal(1000)


def cost_usd(settings: Settings, model: str, prompt_tokens: int, completion_tokens: int) -> Decimal:
    """USD for the given tokens, rounded up to a millionth (``usage_records.cost_usd``).

    A model without a configured or built-in price pays ``config.DEFAULT_PRICE``: never free.
    """
    price = settings.price_for(model)
    cost = (
        Decimal(prompt_tokens) * Decimal(str(price.prompt_per_1k))
        + Decimal(completion_tokens) * Decimal(str(price.completion_per_1k))
    ) / _THOUSAND
    return cost.quantize(_MICRO, rounding=ROUND_CEILING)


def reply_estimate_usd(settings: Settings, model: str, prompt_tokens: int) -> Decimal:
    """The most a reply can cost: its prompt plus a full ``llm_max_reply_tokens`` answer.

    This is what a reply reserves from the project's budget before the provider is called.
    """
    return cost_usd(settings, model, prompt_tokens, settings.llm_max_reply_tokens)
