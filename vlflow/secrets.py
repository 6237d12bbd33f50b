"""The one secret masker: every message, record or dump that may carry a credential goes through `Masker.mask`.

What is masked (each replaced by `***`):
- the userinfo of URLs: `s3://KEY:SECRET@bucket/x` -> `s3://***@bucket/x`;
- values of secret-looking query parameters: `?X-Amz-Signature=abc&token=t` -> `?X-Amz-Signature=***&token=***`;
- with `assignments=True` (backend exception texts, command lines): `password=xyz`, `secret: xyz`, `key='xyz'`;
- known secret values, matched as whole words (`us` is not masked inside `status`): values given explicitly (storage
  options named like credentials, values a workflow interpolated from secret-looking variables) and the values of
  environment variables whose names look secret (KEY, SECRET, TOKEN, PASSWORD, PASSWD, PWD, CREDENTIAL, AUTH, ...)
  when they are at least MIN_ENV_SECRET_LENGTH characters long: `KEYMAP=us` is not a secret worth garbling messages
  for, and `PWD` (the current directory) is not one at all.
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping

MASK = "***"
MIN_ENV_SECRET_LENGTH = 8
MIN_EXPLICIT_SECRET_LENGTH = 4  # shorter "secrets" would mask ordinary words
SECRET_NAME_MARKERS = ("KEY", "SECRET", "TOKEN", "PASSWORD", "PASSWD", "PWD", "PASS", "CREDENTIAL", "AUTH",
                       "SIGNATURE", "PRIVATE", "SESSION", "COOKIE")
NOT_SECRET_NAMES = frozenset({"PWD", "OLDPWD", "PASSENGER", "XAUTHORITY", "KEYMAP", "KEYTABLE"})

_WORD = "A-Za-z0-9"
_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s?#'\"]+)@")
_SECRET_WORDS = r"key|secret|token|passw(?:or)?d|pwd|credential|auth|sig(?:nature)?|session"
_QUERY_SECRET = re.compile(rf"(?P<name>[?&;][^=&#\s]*(?:{_SECRET_WORDS})[^=&#\s]*=)(?P<value>[^&#\s'\"]+)",
                           re.IGNORECASE)
_ASSIGNMENT = re.compile(rf"(?P<name>(?:{_SECRET_WORDS})\w*['\"]?\s*[=:]\s*['\"]?)(?P<value>[^\s,'\"}}&]+)",
                         re.IGNORECASE)


def looks_secret(name: str) -> bool:
    """Whether an environment variable or option name looks like it holds a credential."""
    upper = name.upper()
    if upper in NOT_SECRET_NAMES:
        return False
    return any(marker in upper for marker in SECRET_NAME_MARKERS)


def secret_env_values(env: Mapping[str, str] | None = None) -> set[str]:
    """Values of secret-looking environment variables, long enough to be worth masking."""
    env = os.environ if env is None else env
    return {value for name, value in env.items()
            if looks_secret(name) and len(value.strip()) >= MIN_ENV_SECRET_LENGTH}


class Masker:
    """Masks URL credentials, secret query parameters and known secret values in text."""

    def __init__(self, values: Iterable[str] = (), *, env: Mapping[str, str] | None = None,
                 min_length: int = MIN_EXPLICIT_SECRET_LENGTH) -> None:
        """`values`: known secrets (kept if at least `min_length` long); `env`: also mask its secret-looking values
        (pass os.environ, or a mapping; None leaves the environment out)."""
        known = {v for v in values if isinstance(v, str) and len(v.strip()) >= min_length}
        if env is not None:
            known |= secret_env_values(env)
        self.values = frozenset(known)
        # Longest first, so a secret that contains another is masked whole.
        alternatives = "|".join(re.escape(v) for v in sorted(self.values, key=len, reverse=True))
        self._values = re.compile(rf"(?<![{_WORD}])(?:{alternatives})(?![{_WORD}])") if alternatives else None

    def with_values(self, values: Iterable[str], min_length: int = 1) -> "Masker":
        """A masker that also masks `values` (e.g. secrets a workflow interpolated, whatever their length)."""
        extra = {v for v in values if isinstance(v, str) and len(v.strip()) >= min_length}
        return Masker(self.values | extra, min_length=1)

    def contains(self, text: str) -> bool:
        return self.mask(text) != text

    def mask(self, text: str, *, assignments: bool = False) -> str:
        if not isinstance(text, str) or not text:
            return text
        if self._values is not None:
            text = self._values.sub(MASK, text)
        text = _URL_USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
        text = _QUERY_SECRET.sub(lambda m: f"{m['name']}{MASK}", text)
        if assignments:
            text = _ASSIGNMENT.sub(lambda m: m["name"] + (m["value"] if m["value"] == MASK else MASK), text)
        return text


# Mapping keys that name a credential (storage options such as s3fs's `key`/`secret`, `api_key`, `password`):
# whole key names, so `tokenizer` or `keep_archive` are not taken for secrets.
_CREDENTIAL_KEY = re.compile(r"^(?:key|secret|password|passwd|pwd|token|credentials?|auth)$|"
                             r"[_-](?:secret|password|passwd|pwd|token|credentials?)$|"
                             r"(?:^|[_-])(?:api|access|secret|private|session|account)[_-]?(?:key|key[_-]id|token)$",
                             re.IGNORECASE)


_TOKENIZER_TOKEN = re.compile(r"^(?:pad|cls|sep|mask|unk|bos|eos|special|start|end)[_-]token$", re.IGNORECASE)


def is_credential_key(name: str) -> bool:
    return bool(_CREDENTIAL_KEY.search(str(name))) and not _TOKENIZER_TOKEN.match(str(name))


def mask_credentials(value):
    """A copy of a JSON-like value with the string values of credential-named keys replaced by MASK."""
    if isinstance(value, dict):
        return {k: MASK if is_credential_key(k) and isinstance(v, str) and v else mask_credentials(v)
                for k, v in value.items()}
    if isinstance(value, list):
        return [mask_credentials(v) for v in value]
    return value


def strip_userinfo(url: str) -> str:
    """`url` without its user:password@ part, for display (`s3://bucket/x`)."""
    return _URL_USERINFO.sub(lambda m: m["scheme"], url)


def mask(text: str, *, assignments: bool = False, env: Mapping[str, str] | None = None) -> str:
    """Mask `text` with the current environment's secrets (see the module doc)."""
    return Masker(env=os.environ if env is None else env).mask(text, assignments=assignments)
