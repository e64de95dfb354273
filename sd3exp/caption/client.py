"""An OpenAI-compatible chat client for vision captioners (vLLM, llama-server, Ollama, LM Studio).

GET <url>/models lists the served models; POST <url>/chat/completions gets one
caption, the image sent as a base64 `image_url` data URL. Retries with exponential
backoff (urllib3 Retry, honouring Retry-After) on 429, 5xx, connection errors and
read timeouts; a 4xx other than 429 is the server rejecting this image and is not retried.
"""

from __future__ import annotations

import base64
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from sd3exp.errors import ConfigError, Sd3expError

RETRY_STATUS = (429, 500, 502, 503, 504)
logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)  # each retry's warning; failures are reported
MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp",
        ".bmp": "image/bmp", ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff"}


class CaptionError(Sd3expError):
    """Captioning could not start, or some images got no caption."""


class ImageFailed(Exception):
    """One image got no caption: `kind`, the server's own `message` and a `fix`."""

    def __init__(self, kind: str, message: str, fix: str) -> None:
        self.kind, self.message, self.fix = kind, message, fix
        super().__init__(f"{kind}: {message}")


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: Optional[int] = None  # total tokens, when the server reports usage


def _server_message(response: requests.Response) -> str:
    """The server's own error text: OpenAI's {"error": {"message"}}, vLLM's {"message"}, or the body."""
    try:
        body = response.json()
    except ValueError:
        return response.text.strip()[:500] or response.reason
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])[:500]
        if isinstance(err, str):
            return err[:500]
    return response.text.strip()[:500]


def data_url(image: Path) -> str:
    mime = MIME.get(image.suffix.lower(), "application/octet-stream")
    return f"data:{mime};base64,{base64.b64encode(image.read_bytes()).decode('ascii')}"


def answer_of(body: object) -> Answer:
    """The caption text (and token usage) of a chat completion; ImageFailed without text."""
    try:
        text = body["choices"][0]["message"]["content"]  # type: ignore[index]
    except (KeyError, IndexError, TypeError):
        raise ImageFailed("response without text", f"no choices[0].message.content in {str(body)[:300]}",
                          "check that captioner.url points at an OpenAI-compatible /v1 endpoint") from None
    if isinstance(text, list):  # content parts
        text = "".join(p.get("text", "") for p in text if isinstance(p, dict))
    if not isinstance(text, str) or not text.strip():
        raise ImageFailed("response without text", f"the caption is empty ({text!r})",
                          "raise captioner.max_new_tokens, or check that the model is a vision model")
    usage = body.get("usage") if isinstance(body, dict) else None
    tokens = usage.get("total_tokens") if isinstance(usage, dict) else None
    return Answer(text, tokens if isinstance(tokens, int) else None)


class ChatClient:
    """One client for all worker threads (a requests.Session per thread)."""

    def __init__(self, url: str, model: Optional[str], *, timeout_s: float, retries: int, backoff_s: float,
                 api_key: Optional[str] = None, pool: int = 4) -> None:
        self.url, self.model, self.timeout, self.retries = url.rstrip("/"), model, timeout_s, retries
        self.retry = Retry(total=retries, connect=retries, read=retries, status=retries, other=0,
                           backoff_factor=backoff_s, status_forcelist=RETRY_STATUS,
                           allowed_methods=frozenset({"GET", "POST"}), raise_on_status=False,
                           respect_retry_after_header=True)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.pool, self.local = pool, threading.local()

    def session(self) -> requests.Session:
        if not hasattr(self.local, "session"):
            s = requests.Session()
            s.mount("http://", HTTPAdapter(max_retries=self.retry, pool_maxsize=self.pool))
            s.mount("https://", HTTPAdapter(max_retries=self.retry, pool_maxsize=self.pool))
            s.headers.update(self.headers)
            self.local.session = s
        return self.local.session

    def models(self) -> List[str]:
        """The served model ids; CaptionError when the server cannot be reached or is not OpenAI-compatible."""
        where = f"{self.url}/models"
        try:
            response = self.session().get(where, timeout=self.timeout)
        except requests.RequestException as e:
            raise CaptionError(
                f"captioner.url={self.url!r}: the captioning server is unreachable ({type(e).__name__}: {e}). "
                "Fix: start it (e.g. `vllm serve fancyfeast/llama-joycaption-beta-one-hf-llava`, or llama-server "
                "with --mmproj) and pass its /v1 address as captioner.url=http://HOST:PORT/v1") from None
        try:
            response.raise_for_status()
            return [str(m["id"]) for m in response.json()["data"]]
        except (requests.HTTPError, ValueError, KeyError, TypeError):
            raise CaptionError(f"captioner.url={self.url!r}: GET {where} answered {response.status_code} "
                               f"{_server_message(response)!r}, not an OpenAI model list. Fix: use the server's "
                               "OpenAI-compatible base URL, which ends in /v1") from None

    def check_model(self) -> str:
        """The model to ask: captioner.model if the server lists it, else the only one it serves."""
        served = self.models()
        if self.model in served or (self.model is None and len(served) == 1):
            self.model = self.model or served[0]
            return self.model
        if not served:
            problem = f"the server at {self.url} lists no models (GET /models)"
        elif self.model:
            problem = f"the server at {self.url} does not serve it (it lists: {', '.join(served)})"
        else:
            problem = f"the server at {self.url} serves several models: {', '.join(served)}"
        raise ConfigError("captioner.model", self.model, problem,
                          f"use captioner.model={served[0]}" if served else "load a model into the server")

    def caption(self, image: Path, system: str, prompt: str, max_new_tokens: int, temperature: float) -> Answer:
        body: Dict[str, Any] = {"model": self.model, "max_tokens": max_new_tokens, "temperature": temperature,
                "messages": [{"role": "system", "content": system},
                             {"role": "user", "content": [{"type": "text", "text": prompt},
                                                          {"type": "image_url", "image_url": {"url": data_url(image)}}]}]}
        try:
            response = self.session().post(f"{self.url}/chat/completions", json=body, timeout=self.timeout)
        except requests.exceptions.RetryError as e:
            raise ImageFailed("server error", f"still failing after {self.retry.total} retries: {e}",
                              "check the server's log; lower captioner.workers if it is overloaded") from None
        except (requests.ConnectionError, requests.Timeout) as e:
            tries = f"{self.retries + 1} tries"
            if isinstance(e, requests.Timeout) or "timed out" in str(e).lower():
                raise ImageFailed("timeout", f"no answer within captioner.timeout_s={self.timeout:g} s ({tries})",
                                  "raise captioner.timeout_s or lower captioner.workers") from None
            raise ImageFailed("connection error", f"{type(e).__name__}: {e} ({tries})",
                              "check that the server is still running") from None
        return self._answer(response)

    def _answer(self, response: requests.Response) -> Answer:
        if response.status_code in RETRY_STATUS:
            raise ImageFailed(f"server error {response.status_code}",
                              f"{_server_message(response)} (after {self.retry.total} retries)",
                              "check the server's log; lower captioner.workers if it is overloaded")
        if response.status_code >= 400:
            raise ImageFailed(f"image rejected ({response.status_code})", _server_message(response),
                              "check that the image opens and is RGB PNG/JPEG/WebP, and that the model takes "
                              "images (a vision model; llama-server needs --mmproj)")
        try:
            body = response.json()
        except ValueError:
            raise ImageFailed("response without text", f"the body is not JSON: {response.text[:300]!r}",
                              "check that captioner.url points at an OpenAI-compatible /v1 endpoint") from None
        return answer_of(body)
