import pytest

from kvmkt_connector.config import MarketplaceConfig, describe_defaults


def test_defaults_and_overrides():
    cfg = MarketplaceConfig.from_extra_config({"lease_ttl_s": 10, "transport": "host_shm"})
    assert cfg.lease_ttl_s == 10 and cfg.transport == "host_shm"
    assert MarketplaceConfig.from_extra_config(None) == MarketplaceConfig()
    assert describe_defaults()["min_import_tokens"] == 32


@pytest.mark.parametrize("extra, word", [
    ({"lease_ttl": 5}, "lease_ttl"),  # typo: unknown key is named
    ({"transport": "nvlink"}, "transport"),
    ({"min_import_tokens": "many"}, "min_import_tokens"),
    ({"lease_ttl_s": 0}, "lease_ttl_s"),
    ({"max_pinned_fraction": 0.25}, "max_pinned_fraction"),  # gone: exports pin nothing
])
def test_bad_config_is_refused_with_the_key_named(extra, word):
    with pytest.raises(ValueError, match=word):
        MarketplaceConfig.from_extra_config(extra)


@pytest.mark.parametrize("medium", ["GPU", "cpu", "Gpu"])
def test_vllms_own_media_are_refused_for_kv_events(medium):
    """Under vLLM's own medium our BlockRemoved would delete the instance's real cache
    entries in a router (llm-d keys entries by pod and medium, names lower-cased)."""
    with pytest.raises(ValueError, match="kv_events_medium"):
        MarketplaceConfig.from_extra_config({"kv_events_medium": medium})
    assert MarketplaceConfig.from_extra_config({"kv_events_medium": "kvmkt-gpu"})
    assert MarketplaceConfig.from_extra_config({"kv_events_medium": None})
