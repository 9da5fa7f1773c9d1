"""Setting an SSLContext's session-ticket keys, which Python's ssl module cannot do.

Every worker of an app must seal tickets with the same key for a client to resume its
session at another worker (or another generation). OpenSSL has the call
(``SSL_CTX_set_tlsext_ticket_keys``, a macro over ``SSL_CTX_ctrl`` with
``SSL_CTRL_SET_TLSEXT_TICKET_KEYS``); `ssl` does not expose it. So this module finds the
``SSL_CTX *`` inside the context (CPython's ``PySSLContext`` holds it right after
``PyObject_HEAD``) and calls ``SSL_CTX_ctrl`` through ctypes, in the libssl that
``_ssl`` loaded.

Two ways, the first that this libssl has:

* `install_ticket_callback` (OpenSSL 3's ``SSL_CTX_set_tlsext_ticket_key_evp_cb``): a
  callback seals new tickets with the current key and opens tickets sealed with the
  current or the previous one (the latter renewed), so a rotation costs no client a
  full handshake;
* `set_ticket_key` (``SSL_CTX_set_tlsext_ticket_keys``): one key; after a rotation the
  tickets of the previous one make a full handshake.

Fail safe: the pointer is trusted only if ``SSL_CTX_get_options`` read through it
gives back the context's own options (a changed layout fails that test instead of
crashing), and any lookup that fails makes these calls return a reason instead of
raising, so the worker logs it and serves with OpenSSL's own keys.
"""
from __future__ import annotations

import ctypes
import functools
import ssl

SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
TICKET_KEY_BYTES = 80


class _Lib:
    """The libssl functions we call, found once per process."""

    def __init__(self) -> None:
        path = _loaded_libssl()
        if path is None:
            raise OSError("libssl is not mapped into this process")
        lib = ctypes.CDLL(path)
        self.get_options = lib.SSL_CTX_get_options
        self.get_options.restype = ctypes.c_uint64
        self.get_options.argtypes = [ctypes.c_void_p]
        self.ctrl = lib.SSL_CTX_ctrl
        self.ctrl.restype = ctypes.c_long
        self.ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        self.evp = None   # the callback's functions, when this libssl has them (OpenSSL 3)
        try:
            self.evp = _EvpFunctions(lib, ctypes.CDLL(_loaded("/libcrypto") or "libcrypto.so.3"))
        except (OSError, AttributeError):
            pass


class _Param(ctypes.Structure):
    """OpenSSL 3's OSSL_PARAM."""
    _fields_ = [("key", ctypes.c_char_p), ("data_type", ctypes.c_uint), ("data", ctypes.c_void_p),
                ("data_size", ctypes.c_size_t), ("return_size", ctypes.c_size_t)]


_OSSL_PARAM_UTF8_STRING = 4
_OSSL_PARAM_OCTET_STRING = 5
_OSSL_PARAM_UNMODIFIED = ctypes.c_size_t(-1).value
_TICKET_CB = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                              ctypes.c_void_p, ctypes.c_int)


class _EvpFunctions:
    def __init__(self, ssl_lib, crypto) -> None:
        self.set_cb = ssl_lib.SSL_CTX_set_tlsext_ticket_key_evp_cb
        self.set_cb.restype = ctypes.c_int
        self.set_cb.argtypes = [ctypes.c_void_p, _TICKET_CB]
        self.aes = crypto.EVP_aes_256_cbc
        self.aes.restype = ctypes.c_void_p
        self.aes.argtypes = []
        self.encrypt_init = crypto.EVP_EncryptInit_ex
        self.decrypt_init = crypto.EVP_DecryptInit_ex
        for init in (self.encrypt_init, self.decrypt_init):
            init.restype = ctypes.c_int
            init.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        self.mac_params = crypto.EVP_MAC_CTX_set_params
        self.mac_params.restype = ctypes.c_int
        self.mac_params.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Param)]
        self.rand = crypto.RAND_bytes
        self.rand.restype = ctypes.c_int
        self.rand.argtypes = [ctypes.c_void_p, ctypes.c_int]


def _loaded_libssl() -> str | None:
    return _loaded("/libssl")


def _loaded(name: str) -> str | None:
    """The path of the library `name` that ``_ssl`` (imported for it) mapped here."""
    import _ssl  # noqa: F401 - its libssl is the one whose SSL_CTX we hold
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and name in fields[5]:
                return fields[5]
    return None


@functools.cache
def _library():
    """The process's libssl functions (looked up once), or a str saying why not."""
    try:
        return _Lib()
    except (OSError, AttributeError) as exc:
        return f"cannot load libssl's functions: {exc}"


def ssl_ctx_pointer(context: ssl.SSLContext):
    """The context's ``SSL_CTX *``, or a str saying why it cannot be trusted."""
    lib = _library()
    if isinstance(lib, str):
        return lib
    pointer = ctypes.c_void_p.from_address(id(context) + object.__basicsize__).value
    if not pointer:
        return "no SSL_CTX where CPython keeps it"
    if lib.get_options(pointer) != int(context.options):
        return "the SSL_CTX pointer is not where this Python keeps it"
    return pointer


def set_ticket_key(context: ssl.SSLContext, key: bytes) -> str | None:
    """Seal and open `context`'s session tickets with `key` (80 bytes); None when done,
    else why it was not."""
    if len(key) != TICKET_KEY_BYTES:
        raise ValueError(f"a ticket key is {TICKET_KEY_BYTES} bytes, not {len(key)}")
    pointer = ssl_ctx_pointer(context)
    if isinstance(pointer, str):
        return pointer
    buf = ctypes.create_string_buffer(key, TICKET_KEY_BYTES)
    try:
        if _library().ctrl(pointer, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, TICKET_KEY_BYTES, buf) != 1:
            return "SSL_CTX_set_tlsext_ticket_keys refused the key"
    finally:
        ctypes.memset(buf, 0, TICKET_KEY_BYTES)
    return None


def install_ticket_callback(context: ssl.SSLContext, keys) -> str | None:
    """Seal `context`'s tickets with ``keys()[0]`` and open those of any key in ``keys()``
    (80 bytes each: name, HMAC key, AES key; the current one first), asked at every
    handshake, so a rotation needs no further call. None when installed, else why not
    (then `set_ticket_key` is the way). The callback stays alive with the context."""
    lib = _library()
    if isinstance(lib, str):
        return lib
    evp = lib.evp
    if evp is None:
        return "this libssl has no SSL_CTX_set_tlsext_ticket_key_evp_cb"
    pointer = ssl_ctx_pointer(context)
    if isinstance(pointer, str):
        return pointer
    cipher = evp.aes()
    digest = ctypes.create_string_buffer(b"sha256")

    def params(hmac_key: bytes):
        buf = ctypes.create_string_buffer(hmac_key, len(hmac_key))
        array = (_Param * 3)(
            _Param(b"key", _OSSL_PARAM_OCTET_STRING, ctypes.cast(buf, ctypes.c_void_p), len(hmac_key),
                   _OSSL_PARAM_UNMODIFIED),
            _Param(b"digest", _OSSL_PARAM_UTF8_STRING, ctypes.cast(digest, ctypes.c_void_p), 6,
                   _OSSL_PARAM_UNMODIFIED),
            _Param(None, 0, None, 0, 0))
        return array, buf

    def callback(ssl_ptr, key_name, iv, cipher_ctx, mac_ctx, enc) -> int:
        try:
            current = keys()
            if enc:
                key = current[0]
                ctypes.memmove(key_name, key[:16], 16)
                if evp.rand(iv, 16) != 1:
                    return -1
                array, _buf = params(key[16:48])
                if evp.encrypt_init(cipher_ctx, cipher, None, key[48:80], iv) != 1 \
                        or evp.mac_params(mac_ctx, array) != 1:
                    return -1
                return 1
            name = ctypes.string_at(key_name, 16)
            for index, key in enumerate(current):
                if key[:16] == name:
                    array, _buf = params(key[16:48])
                    if evp.mac_params(mac_ctx, array) != 1 \
                            or evp.decrypt_init(cipher_ctx, cipher, None, key[48:80], iv) != 1:
                        return -1
                    return 1 if index == 0 else 2   # 2: good, and issue a new ticket
            return 0   # a key we no longer have: a full handshake
        except Exception:  # noqa: BLE001 - nothing may unwind into OpenSSL
            return 0
    handle = _TICKET_CB(callback)
    if evp.set_cb(pointer, handle) != 1:
        return "SSL_CTX_set_tlsext_ticket_key_evp_cb refused the callback"
    context._baton_ticket_callback = handle   # it lives as long as the context that calls it
    return None


def has_ticket_callback(context: ssl.SSLContext) -> bool:
    return getattr(context, "_baton_ticket_callback", None) is not None
