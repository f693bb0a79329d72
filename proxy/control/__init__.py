"""The control API: a separate listener for admins and tooling (SPEC section 5)."""
