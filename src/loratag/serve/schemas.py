"""The request and response schemas of `loratag serve` (pydantic; FastAPI builds the OpenAPI schema from them)."""

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator

from .adapters import NAME


def bad_unicode(text: str) -> int | None:
    """The position of the first character that is not valid Unicode text (a lone surrogate such as \\ud800,
    which JSON allows and UTF-8 cannot encode; the tokenizer fails on it), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return e.start
    return None


TEXT_FORMAT = "unicode-text"  # a schema annotation (any text a JSON string carries); the fuzz test generates it
UnicodeText = Annotated[str, WithJsonSchema({"type": "string", "format": TEXT_FORMAT})]


class TagRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    adapter: str = Field(description="adapter name, as listed by GET /v1/adapters")
    text: UnicodeText | None = Field(None, description="one text to tag")
    texts: list[UnicodeText] | None = Field(None, description="several texts (at most --max-texts)")

    @field_validator("text")
    @classmethod
    def text_is_unicode(cls, v):
        if v is not None and (pos := bad_unicode(v)) is not None:
            raise ValueError(f"not valid Unicode text: a lone surrogate at character {pos}")
        return v

    @field_validator("texts")
    @classmethod
    def texts_are_unicode(cls, v):
        for i, t in enumerate(v or []):
            if (pos := bad_unicode(t)) is not None:
                raise ValueError(f"text {i} is not valid Unicode text: a lone surrogate at character {pos}")
        return v

    @model_validator(mode="after")
    def one_of(self):
        if (self.text is None) == (self.texts is None):
            raise ValueError("give exactly one of 'text' or 'texts'")
        return self


class EntityOut(BaseModel):
    text: str
    label: str
    start: int = Field(description="character offset into the text (inclusive)")
    end: int = Field(description="character offset into the text (exclusive)")
    score: float


class DocumentOut(BaseModel):
    text: str
    entities: list[EntityOut]


class TagResponse(BaseModel):
    adapter: str
    results: list[DocumentOut]


class AdapterOut(BaseModel):
    name: str
    status: str = Field(
        description="ready (stacked: answers at once), idle (evicted by --max-adapters: loaded on its next use) or "
        "failed (not served: see error)"
    )
    labels: list[str] = []
    bias: str = Field("none", description="which biases the adapter trained: none, all or lora_only")
    decode: str = Field("argmax", description="how its labels are decoded: argmax, or constrained (valid IOB2 only)")
    context: int = Field(0, description="sub-tokens of the text around each sentence it reads (its run's --context)")
    case: bool = Field(False, description="whether it reads each word's case as its token type (its run's --case)")
    metrics: dict = {}
    error: str | None = Field(None, description="why it failed to load (a served adapter: why its replacement did)")


class AddAdapter(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=NAME.pattern, description="the adapter's name in requests (replaces one of that name)")
    path: str = Field(description="absolute path of a loratag run or PEFT adapter folder under an --allow-root")


class AdaptersResponse(BaseModel):
    adapters: list[AdapterOut]
