"""bridges (later issue)."""
