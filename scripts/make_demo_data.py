"""Make the three demo datasets under ftcore/data/demo/ (deterministic from --seed; output committed).

    arithmetic.jsonl  prompt/completion: one- or two-step word problems, numeric answers (accuracy)
    tickets.jsonl     instruction/input/output: support tickets in 5 classes (F1); a few carry HTML
                      remnants, extra spaces and exact duplicates, so the cleaning report has work
    rewrite.jsonl     chat messages: formal rewrites and one-line summaries, some two-turn (ROUGE)

Usage: python scripts/make_demo_data.py [--seed 0] [--out ftcore/data/demo]
"""

import argparse
import json
import random
from pathlib import Path

NAMES = ["Ava", "Ben", "Cara", "Dan", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jade", "Kai", "Lena", "Milo",
         "Nora", "Omar", "Pia", "Raj", "Sara", "Tom", "Uma", "Vic", "Wen", "Yara", "Zoe"]  # fmt: skip
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "shells", "cards", "coins", "eggs",
         "stamps", "balloons", "candies", "buttons", "toy cars", "oranges"]  # fmt: skip
CONTAINERS = ["box", "bag", "jar", "basket", "crate", "tray"]


def arithmetic_problem(rng: random.Random) -> tuple[str, int]:
    name, other, item = rng.choice(NAMES), rng.choice(NAMES), rng.choice(ITEMS)
    box = rng.choice(CONTAINERS)
    kind = rng.choices(["add", "sub", "mul", "div", "two"], weights=[3, 3, 2, 1, 1])[0]
    if kind == "add":
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        text = rng.choice([
            f"{name} has {a} {item}. {name} gets {b} more. How many {item} does {name} have now?",
            f"There are {a} {item} in one {box} and {b} in another. How many {item} are there in total?",
            f"{name} collected {a} {item} on Monday and {b} on Tuesday. How many {item} did {name} collect?",
        ])  # fmt: skip
        return text, a + b
    if kind == "sub":
        a = rng.randint(10, 90)
        b = rng.randint(1, a - 1)
        text = rng.choice([
            f"{name} had {a} {item} and gave {b} to {other}. How many {item} does {name} have left?",
            f"A shop had {a} {item}. It sold {b} of them. How many {item} are left?",
            f"{name} needs {a} {item} and already has {b}. How many more {item} does {name} need?",
        ])  # fmt: skip
        return text, a - b
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        text = rng.choice([
            f"{name} buys {a} {box}s with {b} {item} in each. How many {item} does {name} buy?",
            f"Each {box} holds {b} {item}. How many {item} are in {a} {box}s?",
            f"One pack of {item} costs {b} dollars. How many dollars do {a} packs cost?",
        ])  # fmt: skip
        return text, a * b
    if kind == "div":
        q, d = rng.randint(2, 12), rng.randint(2, 10)
        text = rng.choice([
            f"{name} shares {q * d} {item} equally among {d} friends. How many {item} does each friend get?",
            f"{q * d} {item} are packed into {d} {box}s equally. How many {item} are in each {box}?",
        ])  # fmt: skip
        return text, q
    a, b = rng.randint(5, 40), rng.randint(2, 20)
    c = rng.randint(1, a + b - 1)
    return f"{name} has {a} {item}, gets {b} more and then gives {c} to {other}. How many {item} are left?", a + b - c


TICKETS = {
    "billing": ["I was charged twice for my {plan} subscription this month",
                "my invoice for {month} shows the wrong amount",
                "why did my card get charged {amount} dollars when my plan costs less",
                "I need a copy of the invoice for order {order} for my accountant",
                "the price on my bill went up without any notice",
                "please update the credit card used for my {plan} plan"],
    "technical": ["the app crashes every time I open the {feature} page",
                  "I get error {code} when I try to upload a file",
                  "the {feature} feature has been very slow since the last update",
                  "sync stopped working on my {device}",
                  "notifications are not showing up on my {device}",
                  "the export to PDF button does nothing"],
    "account": ["I cannot log in even though my password is correct",
                "please change the email address on my account to a new one",
                "how do I delete my account and all my data",
                "my account was locked after too many login attempts",
                "I want to add a second user to my {plan} account",
                "the two-factor code never arrives on my {device}"],
    "shipping": ["my order {order} has not arrived yet and it has been {days} days",
                 "the tracking number for order {order} does not work",
                 "can you ship my order to a different address",
                 "the package was delivered to the wrong house",
                 "when will order {order} be shipped",
                 "the courier left my parcel in the rain and the box is damaged"],
    "refund": ["I returned the item {days} days ago and still have no refund",
               "I want my money back for order {order}, the product is broken",
               "please cancel my {plan} plan and refund the last payment",
               "the item I received is not what I ordered and I want a refund",
               "how long does a refund take to reach my card",
               "I was promised a refund of {amount} dollars but nothing came"],
}  # fmt: skip
OPENERS = ["Hi,", "Hello,", "Hey there,", "Good morning,", "Dear support,", "", "Urgent:", "Hi team,"]
CLOSERS = ["Thanks.", "Please help.", "Thank you!", "", "Can you look into this?", "Regards, {name}",
           "This is really frustrating.", "Any update would be great."]  # fmt: skip
CONTEXT = ["I am on the {plan} plan.", "I use it on my {device}.", "This started in {month}.",
           "I have been a customer for {days} months.", "My customer number is {order}."]  # fmt: skip
FILL = {"plan": ["Basic", "Pro", "Family", "Business"], "month": ["March", "April", "May", "June"],
        "amount": ["19", "45", "99", "120"], "feature": ["settings", "reports", "calendar", "search"],
        "code": ["500", "403", "E42", "timeout"], "device": ["phone", "tablet", "laptop", "iPad"],
        "days": ["5", "10", "14", "21"]}  # fmt: skip
TICKET_INSTRUCTION = "Classify the support ticket as billing, technical, account, shipping or refund."


def ticket(rng: random.Random) -> tuple[str, str]:
    label = rng.choices(list(TICKETS), weights=[5, 5, 4, 4, 3])[0]
    fill = {k: rng.choice(v) for k, v in FILL.items()}
    fill["order"] = f"#{rng.randint(1000, 9999)}"
    body = rng.choice(TICKETS[label]).format(**fill)
    context = rng.choice(CONTEXT).format(**fill) if rng.random() < 0.5 else ""
    text = " ".join(p for p in (rng.choice(OPENERS), body[0].upper() + body[1:] + ".", context,
                                rng.choice(CLOSERS).format(name=rng.choice(NAMES))) if p)  # fmt: skip
    noise = rng.random()
    if noise < 0.03:
        text = f"<p>{text.replace('. ', '.<br>', 1)}</p>"
    elif noise < 0.05:
        text = text.replace(" and ", " &amp; ", 1).replace(" ", "  ", 2)
    return text, label


DOCS = ["report", "slides", "budget", "contract", "schedule", "invoice", "draft", "minutes"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday"]
EVENTS = ["team meeting", "design review", "budget call", "training session", "product demo", "town hall"]
ROOMS = ["room 2", "room 5", "the main hall", "the lab", "room 12"]
TIMES = ["9 am", "10 am", "11 am", "1 pm", "2 pm", "3 pm", "4 pm"]


def rewrite(rng: random.Random) -> list[dict]:
    name, doc, day, day2 = rng.choice(NAMES), rng.choice(DOCS), *rng.sample(DAYS, 2)
    event, room, time = rng.choice(EVENTS), rng.choice(ROOMS), rng.choice(TIMES)
    kind = rng.choice(["formal", "formal", "summary", "summary", "two_turn"])
    if kind == "summary":
        note = rng.choice([
            f"Hi all, just a reminder that the {event} planned for {day} has been moved to {day2} at {time} in {room}. Please update your calendars.",
            f"Quick update: because of a clash, we are moving the {event} from {day} to {day2}. It will start at {time} in {room}.",
            f"Hello everyone, the {event} will no longer happen on {day}. We will meet on {day2} at {time} in {room} instead.",
        ])  # fmt: skip
        answer = f"The {event} moved from {day} to {day2} at {time} in {room}."
        return [{"role": "user", "content": f"Summarize in one line: {note}"}, {"role": "assistant", "content": answer}]
    informal, formal = rng.choice([
        (f"hey {name}, can u send me the {doc} by {day.lower()}? thx",
         f"Dear {name}, could you please send me the {doc} by {day}? Thank you."),
        (f"yo {name} the {doc} is late again, pls fix it asap",
         f"Dear {name}, the {doc} is late again. Please fix it as soon as possible."),
        (f"{name}!! need ur ok on the {doc} before {day.lower()}",
         f"Dear {name}, I need your approval of the {doc} before {day}."),
        (f"hi {name}, cant make the {event} on {day.lower()}, sorry",
         f"Dear {name}, I am sorry, but I cannot attend the {event} on {day}."),
    ])  # fmt: skip
    turns = [{"role": "user", "content": f"Rewrite formally: {informal}"}, {"role": "assistant", "content": formal}]
    if kind == "two_turn":
        short = formal.split(", ", 1)[1]
        turns += [{"role": "user", "content": "Now drop the greeting."},
                  {"role": "assistant", "content": short[0].upper() + short[1:]}]  # fmt: skip
    return turns


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "ftcore" / "data" / "demo"))
    ap.add_argument("--arithmetic", type=int, default=2500)
    ap.add_argument("--tickets", type=int, default=1500)
    ap.add_argument("--rewrite", type=int, default=1200)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    rng = random.Random(f"{args.seed}-arithmetic")
    with open(out / "arithmetic.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for _ in range(args.arithmetic):
            prompt, answer = arithmetic_problem(rng)
            f.write(json.dumps({"prompt": prompt, "completion": str(answer)}) + "\n")

    rng = random.Random(f"{args.seed}-tickets")
    with open(out / "tickets.jsonl", "w", encoding="utf-8", newline="\n") as f:
        rows = []
        for _ in range(args.tickets):
            text, label = ticket(rng)
            rows.append(rows[rng.randrange(len(rows))] if rows and rng.random() < 0.02 else (text, label))
            f.write(json.dumps({"instruction": TICKET_INSTRUCTION, "input": rows[-1][0], "output": rows[-1][1]}) + "\n")

    rng = random.Random(f"{args.seed}-rewrite")
    with open(out / "rewrite.jsonl", "w", encoding="utf-8", newline="\n") as f:
        for _ in range(args.rewrite):
            f.write(json.dumps({"messages": rewrite(rng)}) + "\n")
    for name in ("arithmetic.jsonl", "tickets.jsonl", "rewrite.jsonl"):
        print(f"{out / name}: {(out / name).stat().st_size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
