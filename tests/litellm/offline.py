"""How the LiteLLM proxy is run offline and without a database, by the LiteLLM integration
tests (tests/litellm/conftest.py) and by the bench's LiteLLM row (bench/run.py). Stdlib only:
the bench imports it without pytest."""

# Keep LiteLLM from fetching anything at start (cost map, beta headers, router presets, policy
# templates, blog posts): it uses the copies shipped in the package.
LITELLM_OFFLINE_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
}
# Variables that would make LiteLLM use a database or a cache: it runs without them.
LITELLM_SCRUBBED_ENV = ("DATABASE_URL", "DIRECT_URL", "REDIS_HOST", "REDIS_URL", "REDIS_PORT")
