"""The parser (table-driven and property-based) and the game core's rules."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from parlay import prompts
from parlay.games import Context, objective
from parlay.protocol import ErrorCode, Game, Message, Proposal, ProtocolError, parse_reply

CTX = Context(counts=(1, 2, 2), values_a=(0, 2, 3), values_b=(2, 2, 2))
SEMI = objective("semi-competitive")

PARSES = [
    ("[message] Hello there", Message("Hello there")),
    ("  [MESSAGE]   hi  ", Message("hi")),
    ("[ message ]: hi", Message("hi")),
    ("[message] line one\nline two", Message("line one line two")),
    ("[message] keep this [END] drop this", Message("keep this")),
    ("[message] done[end]", Message("done")),
    ("[propose] (1 book, 2 hats, 0 balls)", Proposal((1, 2, 0))),
    ("[Propose] (1 books, 1 hat, 1 ball)", Proposal((1, 1, 1))),
    ("[PROPOSE](0 BOOKS,0 HATS,2 BALLS)", Proposal((0, 0, 2))),
    ("[proposal] 2 balls, 1 hat, 0 books", Proposal((0, 1, 2))),
    ("[propose] (one book, two hats, no balls) [END]", Proposal((1, 2, 0))),
    ("[propose] (9 books, 0 hats, 0 balls)", Proposal((9, 0, 0))),  # range is the game's business
]

REJECTIONS = [
    ("", ErrorCode.EMPTY),
    ("   \n ", ErrorCode.EMPTY),
    ("[END] everything after end", ErrorCode.EMPTY),
    ("Hello, I want the books.", ErrorCode.NO_PREFIX),
    ("Sure! [message] hi", ErrorCode.NO_PREFIX),
    ("[message] hi [propose] (1 book, 1 hat, 1 ball)", ErrorCode.TWO_PREFIXES),
    ("[message] [message] hi", ErrorCode.TWO_PREFIXES),
    ("[message]", ErrorCode.EMPTY_MESSAGE),
    ("[message]\n", ErrorCode.EMPTY_MESSAGE),
    ("[propose] I want the books", ErrorCode.MALFORMED_PROPOSAL),
    ("[propose] (1 book, 2 hats)", ErrorCode.MALFORMED_PROPOSAL),
    ("[propose] (1 book, 1 book, 1 hat, 1 ball)", ErrorCode.MALFORMED_PROPOSAL),
    ("[propose]", ErrorCode.MALFORMED_PROPOSAL),
]


@pytest.mark.parametrize(("text", "expected"), PARSES)
def test_parses(text, expected):
    assert parse_reply(text) == expected


@pytest.mark.parametrize(("text", "code"), REJECTIONS)
def test_rejections(text, code):
    parsed = parse_reply(text)
    assert isinstance(parsed, ProtocolError) and parsed.code == code


@settings(max_examples=500, deadline=None)
@given(st.text())
def test_any_string_parses_or_gives_a_typed_error(text):
    assert isinstance(parse_reply(text), Message | Proposal | ProtocolError)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["[message]", "[propose]", "(", ")", "book", "hats", "2", "-1", "[END]", " ", ","])))
def test_protocol_shaped_noise_never_raises(parts):
    assert isinstance(parse_reply("".join(parts)), Message | Proposal | ProtocolError)


def test_every_error_code_has_its_own_feedback_line():
    lines = {code: prompts.feedback(code.value, CTX) for code in ErrorCode}
    assert len(set(lines.values())) == len(ErrorCode)


def _game(first="A", cap=20):
    return Game(CTX, SEMI, first_speaker=first, max_messages=cap)


def test_a_deal_scores_and_rewards():
    g = _game()
    g.step("[message] I want the balls")
    g.step("[message] ok, I take the book and the hats")
    g.step("[propose] (0 books, 0 hats, 2 balls)")
    assert g.proposal_owed and g.current_player == "B"
    g.step("[propose] (1 book, 2 hats, 0 balls)")
    assert g.is_terminal and g.outcome.status == "deal"
    assert g.raw_scores == (6, 6) and g.rewards == (6.0, 6.0)


def test_mismatched_proposals_score_zero():
    g = _game()
    g.step("[message] hi")
    g.step("[propose] (1 book, 2 hats, 2 balls)")
    g.step("[propose] (0 books, 1 hat, 2 balls)")
    assert g.outcome.status == "invalid_deal" and g.raw_scores == (0, 0) and g.rewards == (0.0, 0.0)


@pytest.mark.parametrize(
    ("setup", "reply", "code"),
    [
        ([], "[propose] (1 book, 1 hat, 1 ball)", ErrorCode.PROPOSAL_TOO_EARLY),
        (["[message] hi"], "[propose] (2 books, 0 hats, 0 balls)", ErrorCode.OUT_OF_RANGE),
        (["[message] hi"], "[propose] (-1 books, 0 hats, 0 balls)", ErrorCode.OUT_OF_RANGE),
        (["[message] hi", "[propose] (1 book, 0 hats, 0 balls)"], "[message] wait", ErrorCode.PROPOSAL_OWED),
    ],
)
def test_context_rules_reject_with_feedback_and_a_retry(setup, reply, code):
    g = _game()
    for text in setup:
        assert g.step(text).accepted
    player = g.current_player
    turn = g.step(reply)
    assert not turn.accepted and turn.error == code
    assert turn.feedback == prompts.feedback(code.value, CTX)
    assert g.current_player == player  # the same speaker retries
    convo = g.conversation()
    assert convo[-2] == {"role": "assistant", "content": reply}
    assert convo[-1] == {"role": "user", "content": turn.feedback}


def test_rejected_attempts_stay_in_the_record_but_not_in_transcripts():
    g = _game()
    g.step("oops")
    g.step("[message] hello")
    assert [t.accepted for t in g.turns] == [False, True]
    assert all("oops" not in m["content"] for p in "AB" for m in g.transcripts[p])
    assert g.conversation("B")[-1] == {"role": "user", "content": "[message] hello"}


def test_five_consecutive_rejections_abort():
    g = _game()
    for i in range(4):
        g.step("bad")
        assert not g.is_terminal, i
    g.step("[message] fine")  # resets the streak
    for _ in range(5):
        g.step("")
    assert g.outcome.status == "aborted" and g.rewards == (0.0, 0.0)


def test_message_cap_ends_without_a_deal():
    g = _game(cap=3)
    for _ in range(3):
        g.step("[message] talk")
    assert g.outcome.status == "no_deal" and "cap" in g.outcome.reason


def test_proposals_are_hidden_from_the_partner():
    g = _game(first="B")
    g.step("[message] hi")
    g.step("[propose] (0 books, 0 hats, 2 balls)")
    seen_by_b = g.conversation("B")[-1]["content"]
    assert seen_by_b == prompts.protocol_lines()["partner_proposed"]
    assert "2 balls" not in seen_by_b


def test_transcripts_alternate_and_start_right():
    g = _game(first="B")
    for text in ["[message] a", "[message] b", "[message] c"]:
        g.step(text)
    roles_b = [m["role"] for m in g.transcripts["B"]]
    roles_a = [m["role"] for m in g.transcripts["A"]]
    assert roles_b == ["system", "user", "assistant", "user", "assistant"]
    assert roles_a == ["system", "user", "assistant", "user"]


def test_prompts_state_the_objective_weight():
    text = prompts.system_prompt(CTX, "A", objective(0.5), 20)
    assert "0.5 times your partner's points" in text
    assert "each book is worth 0 points, each hat 2 points and each ball 3 points" in text
    neg = prompts.system_prompt(CTX, "B", objective(-0.3), 20)
    assert "minus 0.3 times" in neg
    presets = {prompts.objective_text(objective(n)) for n in ("cooperative", "semi-competitive", "competitive")}
    assert len(presets) == 3


def test_system_prompts_of_one_run_differ_only_in_their_last_line():
    from parlay.games.contexts import all_contexts

    texts = {prompts.system_prompt(c, p, objective("cooperative"), 6) for c in all_contexts()[:20] for p in "AB"}
    heads = {t.rsplit("\n", 1)[0] for t in texts}
    assert len(texts) > 1 and len(heads) == 1  # the game's facts are the last line, after a shared head


def test_game_refuses_moves_after_the_end():
    g = _game(cap=1)
    g.step("[message] only one")
    with pytest.raises(RuntimeError):
        g.step("[message] more")
