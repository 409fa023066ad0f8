"""English glosses for the Korean reasons gateways and card issuers write.

Ops read decline and refusal reasons as the gateway wrote them (the Korean text is what its
support desk and the card issuer will quote back), so the text is kept and an English gloss is
added after it. Terms are matched ignoring spaces, first match wins: specific terms come first.
"""

from __future__ import annotations

import re

GLOSSES: tuple[tuple[str, str], ...] = (
    # Declines: the card or the cardholder.
    ("잔액부족", "insufficient funds"),
    ("잔액이부족", "insufficient funds"),
    ("한도초과", "over the card's limit"),
    ("분실도난", "card reported lost or stolen"),
    ("분실", "card reported lost"),
    ("도난", "card reported stolen"),
    ("거래정지", "card suspended"),
    ("정지된카드", "card suspended"),
    ("거래제한", "transaction restricted by the issuer"),
    ("해지", "card account closed"),
    ("유효기간", "card expired or wrong expiry date"),
    ("유효하지않은카드", "invalid card number"),
    ("카드번호오류", "wrong card number"),
    ("비밀번호", "wrong card password"),
    ("생년월일", "wrong date of birth or business number"),
    ("할부", "instalments not allowed"),
    ("해외", "card not usable abroad"),
    ("사용불가", "card not usable here"),
    ("카드사점검", "card issuer under maintenance"),
    # The customer has no billing key.
    ("등록되지않은구매자", "no billing key registered for this customer"),
    ("등록되지않은사용자", "no billing key registered for this customer"),
    ("등록된정보를찾을수없", "no billing key registered for this customer"),
    # The request, not the card.
    ("이미주문이이루어진", "a payment already exists under this merchant_uid"),
    ("동일한merchant_uid", "a payment already exists under this merchant_uid"),
    ("checksum불일치", "the refundable balance is not the checksum sent"),
    ("취소가능잔액", "more than the refundable balance"),
    ("취소할결제건이존재하지않", "nothing left to refund"),
    ("존재하지않는결제정보", "no such payment"),
    ("인증에실패", "API credentials refused"),
    ("파라미터", "a request field is missing or invalid"),
    ("지원되지않는", "a value the gateway does not support"),
    ("일시적인서버오류", "temporary gateway error"),
    ("통신", "communication error between the gateway and the card company"),
)
HANGUL = re.compile(r"[\uac00-\ud7a3]")
SPACE = re.compile(r"\s+")


def english_for(reason: str | None) -> str | None:
    """The English gloss of a Korean reason, or None (no Korean, or no known term)."""
    if not reason or not HANGUL.search(reason):
        return None
    squeezed = SPACE.sub("", reason)
    return next((english for term, english in GLOSSES if term in squeezed), None)


def glossed(reason: str | None) -> str:
    """The reason as written, with its English gloss unless it already says it."""
    text = reason or ""
    english = english_for(text)
    if english is None or english.casefold() in text.casefold():
        return text
    return f"{text} ({english})"
