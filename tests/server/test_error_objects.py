"""Every error the server sends is one OpenAI error object whose type follows its status: a 4xx
is ``invalid_request_error``; every 500 (an exception while handling, a request the engine
failed) is vLLM's ``InternalServerError`` with code 500; another 5xx is ``server_error``."""

from __future__ import annotations

import pytest

from tessellm.core.outputs import CompletionOutput, RequestOutput
from tessellm.entrypoints.openai.errors import OpenAIError
from tessellm.entrypoints.openai.serving import engine_error, raise_if_error


def _failed() -> OpenAIError:
    out = RequestOutput("r", "Hi", [1], [CompletionOutput(0, "", [], None, None, "error", "boom")], True)
    with pytest.raises(OpenAIError) as info:
        raise_if_error(out)
    return info.value


@pytest.mark.parametrize("error", [
    pytest.param(engine_error(RuntimeError("kaput")), id="exception"),
    pytest.param(OpenAIError("Internal error in an engine replica: KeyError: 'x'", 500), id="replica"),
    pytest.param(_failed(), id="finish_reason_error"),
])
def test_every_500_is_vllms_internal_server_error(error):
    body = error.body()["error"]
    assert error.status == 500
    assert (body["type"], body["code"], body["param"]) == ("InternalServerError", 500, None), body


def test_the_other_statuses_keep_their_types():
    assert OpenAIError("bad", 400).body()["error"]["type"] == "invalid_request_error"
    assert OpenAIError("gone", 404, "model", "model_not_found").body()["error"]["code"] == "model_not_found"
    unavailable = OpenAIError("The engine core is not running (it died).", 503).body()["error"]
    assert (unavailable["type"], unavailable["code"]) == ("server_error", None)
    gateway = OpenAIError("The engine replica ended its response without a body.", 502).body()["error"]
    assert gateway["type"] == "server_error"  # was invalid_request_error: no 5xx is the client's fault


def test_transient_503s_say_when_to_retry_beside_the_error_object():
    """A refusal that lasts a moment carries ``Retry-After`` (seconds) and the same OpenAI error
    object body; one that lasts (the engine dead) carries none."""
    import json

    from tessellm.core.core_tokenizer import LOADING_REFUSAL, TokenizerLoadingError
    from tessellm.core.engine_process import EngineDeadError

    loading = engine_error(TokenizerLoadingError(LOADING_REFUSAL, "structured_outputs"))
    response = loading.response()
    assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
    assert json.loads(response.body) == loading.body()
    assert loading.body()["error"]["code"] == "tokenizer_loading"
    dead = engine_error(EngineDeadError("the engine core died")).response()
    assert dead.status_code == 503 and "retry-after" not in dead.headers


def test_ray_ingress_overload_and_lost_replica_say_when_to_retry():
    pytest.importorskip("ray")
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError

    from tessellm.entrypoints.ray_serve.ingress import _replica_error

    for exc, code in ((BackPressureError(num_queued_requests=4, max_queued_requests=4), "overloaded"),
                      (RayActorError(), "replica_unavailable")):
        response = _replica_error(exc).response()
        assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1, code
        assert b'"code":"%s"' % code.encode() in response.body
    told = _replica_error(BackPressureError(num_queued_requests=4, max_queued_requests=4, retry_after_s=2.5))
    assert told.response().headers["retry-after"] == "3"  # Serve's own, whole seconds up
