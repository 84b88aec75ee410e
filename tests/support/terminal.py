"""What a terminal shows after some output: enough of a VT100 for progress lines."""

from __future__ import annotations


def screen(text: str) -> list[str]:
    """What a terminal shows after *text*: the few control sequences progress uses."""
    rows: list[str] = [""]
    row = column = 0
    position = 0
    while position < len(text):
        char = text[position]
        if char == "\033":
            end = position + 2
            while not text[end].isalpha():
                end += 1
            argument, command = text[position + 2 : end], text[end]
            if command == "K":
                rows[row] = rows[row][:column]
            elif command == "F":
                row, column = max(0, row - int(argument or 1)), 0
            elif command == "J":
                rows[row] = rows[row][:column]
                del rows[row + 1 :]
            position = end + 1
            continue
        if char == "\r":
            column = 0
        elif char == "\n":
            row, column = row + 1, 0
        else:
            rows[row] = rows[row][:column].ljust(column) + char + rows[row][column + 1 :]
            column += 1
        while len(rows) <= row:
            rows.append("")
        position += 1
    return [line for line in rows if line] if rows else []
