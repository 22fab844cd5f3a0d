"""Campaign service: journey definitions, enrollments, durable timers and stats."""
