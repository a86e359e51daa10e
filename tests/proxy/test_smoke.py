from tests.conftest import Gateway


async def test_chat_is_charged_exactly(gateway: Gateway) -> None:
    key = await gateway.create_key(alias="team-a", max_budget=1.0, budget_duration="1mo")
    assert key["key"].startswith("sk-bg-")
    r = await gateway.chat(key["key"], max_tokens=10)
    assert r.status_code == 200, r.text
    assert r.headers["x-budget-spend"] == "0.01"
    assert r.headers["x-budget-max-budget"] == "1.0"
    got = (await gateway.admin("GET", f"/admin/keys/{key['id']}")).json()
    assert got["spend"] == 0.01
    assert got["reserved"] == 0.0


async def test_stream_null_means_not_streamed(gateway: Gateway) -> None:
    key = await gateway.create_key(max_budget=1.0)
    r = await gateway.chat(key["key"], max_tokens=10, stream=None)
    assert r.status_code == 200, r.text
    assert r.json()["object"] == "chat.completion"
    assert r.headers["x-budget-spend"] == "0.01"
