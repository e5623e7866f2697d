/* ring_buffer.h - a fixed-size byte ring buffer for interrupt handlers.
 *
 * Single producer, single consumer; head and tail are only ever written by
 * one side each, so no lock is needed on a uniprocessor.
 */
#ifndef RING_BUFFER_H
#define RING_BUFFER_H

#include <stddef.h>
#include <stdint.h>

#define RING_SIZE 256u

struct ring_buffer {
	volatile uint16_t head;
	volatile uint16_t tail;
	uint8_t data[RING_SIZE];
};

static inline int ring_put(struct ring_buffer *r, uint8_t byte)
{
	uint16_t next = (uint16_t)((r->head + 1u) % RING_SIZE);
	if (next == r->tail)
		return -1;	/* full */
	r->data[r->head] = byte;
	r->head = next;
	return 0;
}

size_t ring_count(const struct ring_buffer *r);

#endif /* RING_BUFFER_H */
