"""Credentials for trying the webhooks by hand (see the README's examples).

    python scripts/sign.py twilio --token TOKEN --url URL Key=Value ...   # X-Twilio-Signature
    python scripts/sign.py jwt --secret SECRET --audience AUD [--sub ID]  # HS256 bearer token
"""

from __future__ import annotations

import argparse
import sys
import time

import jwt

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))

from services.ingest.webhooks import twilio_signature  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="kind", required=True)
    tw = sub.add_parser("twilio")
    tw.add_argument("--token", required=True)
    tw.add_argument("--url", required=True)
    tw.add_argument("params", nargs="*", help="Key=Value form parameters, as posted")
    tok = sub.add_parser("jwt")
    tok.add_argument("--secret", required=True)
    tok.add_argument("--audience", required=True)
    tok.add_argument("--sub", default=None, help="the authenticated customer (app webhook)")
    tok.add_argument("--ttl", type=int, default=3600)
    args = parser.parse_args()
    if args.kind == "twilio":
        params = dict(p.split("=", 1) for p in args.params)
        print(twilio_signature(args.token, args.url, params))
    else:
        claims = {"aud": args.audience, "exp": int(time.time()) + args.ttl, "iat": int(time.time())}
        if args.sub:
            claims["sub"] = args.sub
        print(jwt.encode(claims, args.secret, algorithm="HS256"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
