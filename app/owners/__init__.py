"""Teams, users, end users and tags (SPEC 11): the owners of budgets besides keys."""
