"""Pure core: no I/O, no threads, no clock of its own. Everything here is testable in isolation."""
