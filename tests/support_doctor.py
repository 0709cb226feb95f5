"""What the halves of test_doctor.py share (tests/unit, tests/netns):
the helpers, fixtures and constants that its tests of more than one kind use.
Written by the script that grouped the tests by kind; change them here."""

PORT = 7000
